// Stream text to an hmlstm server from Node.js and print each layer's segments.
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node segment.js 127.0.0.1:50051 path/to/protos "Some text to segment."
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target = "127.0.0.1:50051", protoRoot = "protos", text = "The for statement is used to iterate."] =
  process.argv.slice(2);
const def = loader.loadSync("hmlstm/v1/segmenter.proto", { includeDirs: [protoRoot], longs: Number, arrays: true, keepCase: true });
const { Segmenter } = grpc.loadPackageDefinition(def).hmlstm.v1;
const client = new Segmenter(target, grpc.credentials.createInsecure());

const call = client.StreamSegment();
call.on("data", (r) => {
  for (const s of r.segments) {
    if (s.final) console.log(`layer ${s.layer} [${s.start}, ${s.end}) ${JSON.stringify(s.text)}`);
  }
  if (r.final) console.log(`done: ${r.processed_chars} characters`);
});
call.on("error", (e) => { console.error(`${grpc.status[e.code]}: ${e.details}`); process.exit(1); });
call.on("end", () => client.close());

// Offsets count Unicode code points; JavaScript strings are UTF-16, so split with [...text].
const chars = [...text];
call.write({ config: { top_k: 0 } });
for (let offset = 0; offset < chars.length; offset += 16) {
  call.write({ chunk: { offset, text: chars.slice(offset, offset + 16).join("") } });
}
call.end();
