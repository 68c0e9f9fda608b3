// Reading Server-Sent Events in tests: the handler's and the relayed (placement) streams.
import assert from "node:assert/strict";

/** One event of a stream; a comment is `{ event: ":", data: text }`. */
export interface SseEvent {
  event: string;
  data: unknown;
}

/** Reads an event stream to its end; comments are reported as `{ event: ":", data: text }`. */
export async function readEvents(
  response: Response,
  onEvent: (event: SseEvent) => void = () => {},
): Promise<SseEvent[]> {
  const events: SseEvent[] = [];
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) !== -1) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data: string[] = [];
      let parsed: SseEvent | undefined;
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) parsed = { event: ":", data: line.slice(1).trim() };
        else if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data.push(line.slice(6));
      }
      parsed ??= { event, data: JSON.parse(data.join("\n")) };
      events.push(parsed);
      onEvent(parsed);
    }
  }
  assert.equal(buffer, "", "the stream ends on an event boundary");
  return events;
}
