// A plain WebSocket client as in upstream's documentation: prints "open", then each message
// on its own line; "closed <code> <reason>" when the server closes.
const WebSocket = require("ws");

const ws = new WebSocket(process.argv[2]);
ws.on("open", () => console.log("open"));
ws.on("message", (data) => console.log(data.toString()));
ws.on("close", (code, reason) => {
  console.log(`closed ${code} ${reason.toString()}`);
  process.exit(0);
});
ws.on("error", (err) => {
  console.log(`error ${err.message}`);
  process.exit(1);
});
