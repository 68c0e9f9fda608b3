import { test } from "./_test.ts";
import assert from "node:assert/strict";
import { codexErrorCode, summarizeCodexError } from "../src/_turn_runner.ts";

test("codexErrorCode() says unauthorized for codex's own code and for any provider 401", () => {
  assert.equal(codexErrorCode("unauthorized"), "unauthorized");
  assert.equal(codexErrorCode({ httpConnectionFailed: { httpStatusCode: 401 } }), "unauthorized");
  assert.equal(
    codexErrorCode({ responseStreamConnectionFailed: { httpStatusCode: 401 } }),
    "unauthorized",
  );
});

test("codexErrorCode() passes codex's other codes through, and names object variants", () => {
  assert.equal(codexErrorCode("usageLimitExceeded"), "usageLimitExceeded");
  assert.equal(codexErrorCode("internalServerError"), "internalServerError");
  assert.equal(
    codexErrorCode({ responseStreamDisconnected: { httpStatusCode: 502 } }),
    "responseStreamDisconnected",
  );
  assert.equal(codexErrorCode(null), "other");
  assert.equal(codexErrorCode(undefined), "other");
});

test("summarizeCodexError() ignores what is not a codex TurnError", () => {
  assert.equal(summarizeCodexError(null, null), undefined);
  assert.equal(summarizeCodexError({ codexErrorInfo: "other" }, true), undefined);
  assert.deepEqual(summarizeCodexError({ message: "m", codexErrorInfo: "badRequest" }, false), {
    code: "badRequest",
    message: "m",
    codexErrorInfo: "badRequest",
    httpStatusCode: null,
    additionalDetails: null,
    willRetry: false,
  });
});
