// Stream text to an hmlstm server from Node.js and print each layer's segments.
//   npm install @grpc/grpc-js @grpc/proto-loader
//   node segment.js 127.0.0.1:50051 path/to/protos "Some text to segment."
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [target = "127.0.0.1:50051", protoRoot = "protos", given = "The for statement is used to iterate."] =
  process.argv.slice(2);
// keepCase: field names as in the .proto; defaults: unset fields as their default (start = 0 is
// not sent on the wire); arrays: empty repeated fields as []; longs: uint64 as Number.
const def = loader.loadSync("hmlstm/v1/segmenter.proto",
  { includeDirs: [protoRoot], keepCase: true, defaults: true, arrays: true, longs: Number });
const { Segmenter } = grpc.loadPackageDefinition(def).hmlstm.v1;
const client = new Segmenter(target, grpc.credentials.createInsecure());

client.DescribeModel({}, (err, info) => {
  if (err) { console.error(`${grpc.status[err.code]}: ${err.details}`); process.exit(1); }
  // A model trained without delimiters (info.trained_without, e.g. " \n\t") segments text
  // whose boundaries are not marked: send the text without them.
  const text = [...given].filter((c) => !info.trained_without.includes(c)).join("");
  const call = client.StreamSegment();
  call.on("data", (r) => {
    for (const s of r.segments) {
      if (s.final) console.log(`layer ${s.layer} [${s.start}, ${s.end}) ${JSON.stringify(s.text)}`);
    }
    // With look-ahead (info.lookahead_chars = K), boundaries are decided up to r.decided_chars, K behind
    // r.processed_chars; the final response decides the rest.
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
});
