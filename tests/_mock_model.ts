// The loopback model provider of the tests is the one ./testing ships (src/_testing_mock_model.ts).
export { echo, execThenReply, reply, startMockModel } from "../src/_testing_mock_model.ts";
export type {
  MockModel,
  MockModelOptions,
  MockModelRequest,
  MockReply,
  MockResponder,
} from "../src/_testing_mock_model.ts";
