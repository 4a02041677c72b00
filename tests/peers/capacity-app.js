// An app written with Node.js's own `http` module whose latency climbs with concurrency: it
// has WORKERS workers, each taking SERVICE_MS per request, and queues the rest (first come,
// first served), as a thread-pool server does. STALL_PERCENT of requests (chosen at random)
// take STALL_MS instead: one slow replica. Settings come from the environment. /count answers
// how many requests arrived (itself not counted, not queued); anything else is work.
// Prints one JSON readiness line.
const http = require('http');
const WORKERS = Number(process.env.WORKERS || 8);
const SERVICE_MS = Number(process.env.SERVICE_MS || 20);
const STALL_PERCENT = Number(process.env.STALL_PERCENT || 0);
const STALL_MS = Number(process.env.STALL_MS || 1000);
let busy = 0;
let count = 0;
const queue = [];
function run(res) {
  busy += 1;
  const ms = Math.random() * 100 < STALL_PERCENT ? STALL_MS : SERVICE_MS;
  setTimeout(() => {
    if (!res.destroyed) res.end('done\n');
    busy -= 1;
    while (queue.length > 0) {
      const next = queue.shift();
      if (!next.destroyed) { run(next); break; }
    }
  }, ms);
}
const server = http.createServer((req, res) => {
  req.resume();
  if (req.url === '/count') {
    res.end(String(count));
    return;
  }
  count += 1;
  if (busy < WORKERS) run(res); else queue.push(res);
});
server.keepAliveTimeout = 60000;
server.listen(0, '127.0.0.1', () => {
  const a = server.address();
  console.log(JSON.stringify({ event: 'ready', addr: `${a.address}:${a.port}` }));
});
