// Streams one generation from a pagedserve server, loading the API from the .proto alone.
// Usage: node generate.js HOST:PORT PROTO_ROOT PROMPT MAX_TOKENS
// Prints one JSON line per streamed response, then {"status": "OK"} or the status and details.
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoRoot, prompt, maxTokens] = process.argv.slice(2);

const definition = protoLoader.loadSync(path.join("pagedserve", "v1", "generation.proto"), {
  includeDirs: [protoRoot],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: false,
  oneofs: true,
});
const api = grpc.loadPackageDefinition(definition).pagedserve.v1;
const client = new api.GenerationService(address, grpc.credentials.createInsecure());

const request = {
  prompt: prompt,
  max_tokens: Number(maxTokens),
  temperature: 0,
};
const call = client.Generate(request, { deadline: Date.now() + 60000 });
call.on("data", (response) => {
  process.stdout.write(JSON.stringify(response) + "\n");
});
// "status" comes exactly once, last, for success and failure alike; "error" would also fire
// for a failure (and crash the process if unhandled), so it is only acknowledged.
call.on("error", () => {});
call.on("status", (status) => {
  const line = { status: grpc.status[status.code] };
  if (status.code !== grpc.status.OK) {
    line.details = status.details;
    process.exitCode = 1;
  }
  process.stdout.write(JSON.stringify(line) + "\n");
  client.close();
});
