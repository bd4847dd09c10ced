// A socket.io v4 client as upstream users write it: io("http://host:8080/<instance>").
// Prints "connected", then one JSON line per event: {"name": ..., "data": ...};
// "refused <message>" on connect_error.
const { io } = require("socket.io-client");

const [url, apikey, transport] = process.argv.slice(2);
const options = { reconnection: false, query: apikey ? { apikey } : {} };
if (transport) options.transports = [transport];
const socket = io(url, options);
socket.on("connect", () => console.log("connected"));
socket.onAny((name, data) => console.log(JSON.stringify({ name, data })));
socket.on("connect_error", (err) => {
  console.log(`refused ${err.message}`);
  process.exit(0);
});
socket.on("disconnect", (reason) => {
  console.log(`disconnected ${reason}`);
  process.exit(0);
});
