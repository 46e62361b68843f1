// Two clients of the official `phoenix` JavaScript client in one conversation, driven by
// tests/ws_phoenix.rs. It prints one JSON object per line on stdout and takes commands on stdin.
//
// Environment:
//   FERRY_SOCKET_URL    ws://127.0.0.1:PORT/socket (the client appends /websocket?vsn=2.0.0)
//   FERRY_CONVERSATION  conversation id
//   FERRY_ALICE_TOKEN   JWT for alice, sent the phoenix 1.8 way (authToken → subprotocol)
//   FERRY_BOB_TOKEN     JWT for bob, sent as the `token` socket param (query string)
//   FERRY_ALICE_SENDS   how many messages alice sends over the socket after her first join
//
// Output events: {event: "joined", client, after_seq, response}, {event: "seen", client, seq},
// {event: "sent", client, seq}, {event: "sent_all", client}, {event: "problem", client, detail},
// and on `finish N` (stdin): {event: "done", client, seqs, ids, senders, joins, problems}.
//
// Each client rejoins with `params: () => ({after_seq: lastSeq})`, so after a reconnect it asks
// for exactly what it has not seen. It records every "message" push it gets, without filtering:
// a gap or a repeat shows up in `seqs` (and as a "problem").

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

const url = env("FERRY_SOCKET_URL");
const topic = `conversation:${env("FERRY_CONVERSATION")}`;
const aliceSends = Number(process.env.FERRY_ALICE_SENDS || "0");
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function startClient(name, socketOptions, onFirstJoin) {
  const state = { name, lastSeq: 0, seqs: [], ids: [], senders: [], joins: [], problems: [] };
  const socket = new Socket(url, {
    transport: WebSocket,
    // Quick retries so a restarted server is found again within the test's time.
    reconnectAfterMs: (tries) => [50, 100, 200][tries - 1] ?? 250,
    rejoinAfterMs: (tries) => [50, 100, 200][tries - 1] ?? 250,
    ...socketOptions,
  });
  socket.onError((error) => out({ event: "socket_error", client: name, detail: String(error && error.message || error) }));
  socket.connect();
  const channel = socket.channel(topic, () => {
    const params = { after_seq: state.lastSeq };
    state.joins.push(params.after_seq);
    return params;
  });
  channel.on("message", (message) => {
    if (message.seq !== state.lastSeq + 1) {
      const detail = `got seq ${message.seq} after ${state.lastSeq}`;
      state.problems.push(detail);
      out({ event: "problem", client: name, detail });
    }
    state.lastSeq = Math.max(state.lastSeq, message.seq);
    state.seqs.push(message.seq);
    state.ids.push(message.id);
    state.senders.push(message.sender);
    out({ event: "seen", client: name, seq: message.seq });
  });
  let joinedOnce = false;
  channel
    .join()
    .receive("ok", (response) => {
      out({ event: "joined", client: name, after_seq: state.joins[state.joins.length - 1], response });
      if (!joinedOnce) {
        joinedOnce = true;
        onFirstJoin && onFirstJoin(channel, state);
      }
    })
    .receive("error", (response) => out({ event: "join_error", client: name, response }))
    .receive("timeout", () => out({ event: "join_timeout", client: name }));
  return { state, socket, channel };
}

// Alice sends one message at a time, each after the previous one's ok (which comes only once
// the message is durable).
async function aliceSendAll(channel, state) {
  for (let i = 0; i < aliceSends; i++) {
    const seq = await new Promise((resolve, reject) => {
      channel
        .push("send", { content: { from: "alice", i }, idempotency_key: `alice-${i}` })
        .receive("ok", (ack) => resolve(ack.seq))
        .receive("error", (e) => reject(new Error(`send ${i} failed: ${JSON.stringify(e)}`)))
        .receive("timeout", () => reject(new Error(`send ${i} timed out`)));
    });
    out({ event: "sent", client: state.name, seq });
  }
  out({ event: "sent_all", client: state.name });
}

const alice = startClient("alice", { authToken: env("FERRY_ALICE_TOKEN") }, (channel, state) => {
  aliceSendAll(channel, state).catch((e) => out({ event: "problem", client: "alice", detail: String(e) }));
});
const bob = startClient("bob", { params: { token: env("FERRY_BOB_TOKEN") } });
const clients = [alice, bob];

async function finish(lastSeq) {
  const deadline = Date.now() + 20000;
  while (clients.some((c) => c.state.lastSeq < lastSeq) && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
  }
  // Anything beyond lastSeq (a repeat or a stray push) would arrive now.
  await new Promise((r) => setTimeout(r, 200));
  for (const { state } of clients) {
    out({
      event: "done",
      client: state.name,
      seqs: state.seqs,
      ids: state.ids,
      senders: state.senders,
      joins: state.joins,
      problems: state.problems,
    });
  }
  for (const { socket } of clients) socket.disconnect();
  process.exit(0);
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const [command, arg] = line.trim().split(/\s+/);
  if (command === "finish") finish(Number(arg));
});
