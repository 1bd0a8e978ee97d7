// An sfox-relay receiver in an existing Express service: copy what you need.
//
// It verifies the Standard Webhooks signature (without a timestamp tolerance, so that a
// backlog delivered after an outage still verifies), deduplicates on webhook-id (the relay
// delivers at least once), decrypts an encrypt-policy user token, and keeps the newest state
// of each user by the sfox-timestamp header: JSON numbers are doubles in JavaScript, so the
// body's 19-digit timestamp would be rounded; the header holds its digits, compared as BigInt.
//
//   npm install && WEBHOOK_SECRET=whsec_... TOKEN_KEY=<base64> PORT=8000 node server.js
//
// `seen` and `users` are Maps here; in a service they are your database, and the dedupe check
// and the state update belong in one transaction.
"use strict";

const crypto = require("node:crypto");
const express = require("express");

const secrets = process.env.WEBHOOK_SECRET.trim().split(/\s+/)
  .map((secret) => Buffer.from(secret.replace(/^whsec_/, ""), "base64"));
const tokenKey = process.env.TOKEN_KEY ? Buffer.from(process.env.TOKEN_KEY, "base64") : null;

const seen = new Set(); // webhook-ids already handled
const users = new Map(); // user_id -> newest state

function verified(headers, body) {
  const signed = Buffer.concat([
    Buffer.from(`${headers["webhook-id"]}.${headers["webhook-timestamp"]}.`), body,
  ]);
  const given = headers["webhook-signature"].split(" ").map((s) => s.split(",")[1] || "");
  return secrets.some((key) => {
    const digest = Buffer.from(crypto.createHmac("sha256", key).update(signed).digest("base64"));
    return given.some((sig) => sig.length === digest.length
      && crypto.timingSafeEqual(Buffer.from(sig), digest));
  });
}

// The encrypt policy: AES-256-GCM, the webhook-id as associated data; the 16-byte GCM tag is
// the end of `ciphertext`.
function decryptToken(userToken, webhookId) {
  if (!tokenKey || !userToken || userToken.alg !== "A256GCM") return null;
  const data = Buffer.from(userToken.ciphertext, "base64");
  const decipher = crypto.createDecipheriv(
    "aes-256-gcm", tokenKey, Buffer.from(userToken.nonce, "base64"));
  decipher.setAAD(Buffer.from(webhookId));
  decipher.setAuthTag(data.subarray(data.length - 16));
  return Buffer.concat([decipher.update(data.subarray(0, data.length - 16)), decipher.final()])
    .toString("utf8");
}

const app = express();

app.post("/webhooks/sfox", express.raw({ type: "application/json", limit: "2mb" }), (req, res) => {
  const headers = req.headers;
  if (!headers["webhook-id"] || !headers["webhook-timestamp"] || !headers["webhook-signature"]) {
    return res.status(400).send("not a Standard Webhooks request");
  }
  if (!verified(headers, req.body)) return res.status(401).send("bad signature"); // not retried
  const webhookId = headers["webhook-id"];
  if (seen.has(webhookId)) return res.status(204).end(); // a retry of what we already have
  const message = JSON.parse(req.body.toString("utf8"));
  const payload = message.payload || {};
  if (payload.user_id !== undefined) {
    const stamp = BigInt(headers["sfox-timestamp"]);
    const current = users.get(payload.user_id);
    if (!current || stamp >= current.sfoxTimestamp) {
      users.set(payload.user_id, {
        status: payload.status,
        requirements: payload.requirements,
        sfoxTimestamp: stamp,
        token: decryptToken(payload.user_token, webhookId),
      });
    }
  }
  seen.add(webhookId);
  return res.status(204).end();
});

// What this receiver holds (for the demo and the test).
app.get("/users", (req, res) => {
  const out = {};
  for (const [userId, state] of users) {
    out[userId] = { ...state, sfox_timestamp: state.sfoxTimestamp.toString() };
    delete out[userId].sfoxTimestamp;
  }
  res.json({ deliveries: seen.size, users: out });
});

app.listen(Number(process.env.PORT || 8000), "127.0.0.1");
