// One official `phoenix` JavaScript client whose token expires, driven by tests/ws_phoenix.rs.
// It prints one JSON object per line on stdout and takes commands on stdin.
//
// Environment:
//   FERRY_SOCKET_URL    ws://127.0.0.1:PORT/socket
//   FERRY_CONVERSATION  conversation id
//   FERRY_TOKEN         the first token (sent as the `token` socket param)
//
// Commands: `token JWT` replaces the token the next connection attempt sends (the socket's
// `params` is a function, as an app refreshing its tokens would write it).
//
// Output events: {event: "open"}, {event: "joined", after_seq}, {event: "seen", seq},
// {event: "channel_error"}, {event: "closed", code, reason}, {event: "socket_error"},
// {event: "join_error", response}.

import { Socket } from "phoenix";
import WebSocket from "ws";
import readline from "node:readline";

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.error(`missing environment variable ${name}`);
    process.exit(2);
  }
  return value;
};

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
let token = env("FERRY_TOKEN");
let lastSeq = 0;

const socket = new Socket(env("FERRY_SOCKET_URL"), {
  transport: WebSocket,
  params: () => ({ token }),
  reconnectAfterMs: (tries) => [50, 100, 200][tries - 1] ?? 250,
  rejoinAfterMs: (tries) => [50, 100, 200][tries - 1] ?? 250,
});
socket.onOpen(() => out({ event: "open" }));
socket.onClose((e) => out({ event: "closed", code: e.code, reason: e.reason }));
socket.onError(() => out({ event: "socket_error" }));
socket.connect();

const channel = socket.channel(`conversation:${env("FERRY_CONVERSATION")}`, () => ({
  after_seq: lastSeq,
}));
channel.onError(() => out({ event: "channel_error" }));
channel.on("message", (message) => {
  lastSeq = Math.max(lastSeq, message.seq);
  out({ event: "seen", seq: message.seq });
});
channel
  .join()
  .receive("ok", () => out({ event: "joined", after_seq: lastSeq }))
  .receive("error", (response) => out({ event: "join_error", response }));
// Rejoins after a reconnect answer through the same push.

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [command, arg] = line.trim().split(/\s+/, 2);
  if (command === "token") token = arg;
});
