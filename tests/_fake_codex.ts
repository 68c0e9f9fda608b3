// A stand-in for `codex app-server`, run by the test's runtime: serves `GET /readyz` with
// 200 on a loopback port and announces it on stderr the way codex does. Arguments are
// ignored. It exits on SIGTERM.
import { createServer } from "node:http";
import process from "node:process";

const server = createServer((request, response) => {
  response.writeHead(request.url === "/readyz" ? 200 : 404).end();
});
server.listen(0, "127.0.0.1", () => {
  const address = server.address();
  const port = typeof address === "object" && address ? address.port : 0;
  process.stderr.write(`listening on: ws://127.0.0.1:${port}\n`);
});
process.on("SIGTERM", () => process.exit(0));
