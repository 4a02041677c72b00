// An app written with Node.js's own `http` module and its defaults (which refuse an HTTP/1.1
// request without Host, and see an absolute-form target as the URL): what a real Node app
// receives. Routes: /hello answers 200 with what the request looked like, as JSON; /count
// answers how many requests arrived; /sink reads the whole body and answers its size in bytes;
// /bytes/<n> streams n bytes in 64 KiB chunks as the socket drains; /stall/<ms> sends the head
// and one chunk, then nothing for that long before ending; /healthz answers 200 while healthy
// and the request carries `x-probe: 1` (401 without it), 500 once /sick was called; /conns
// answers, as JSON, how many connections that carried any other request have closed, and of
// those how many the caller closed first (Node saw its FIN) rather than Node's own keep-alive
// timeout (5 s by default, kept), itself not counted anywhere; anything else 404. Prints one
// JSON readiness line.
const http = require('http');
let count = 0;
let healthy = true;
const conns = { closed: 0, closed_by_caller: 0 };
const server = http.createServer((req, res) => {
  if (req.url === '/conns') {
    res.setHeader('content-type', 'application/json');
    res.end(JSON.stringify(conns));
    return;
  }
  count += 1;
  req.socket.counted = true;
  if (req.url === '/healthz') {
    res.statusCode = req.headers['x-probe'] !== '1' ? 401 : healthy ? 200 : 500;
    res.end(healthy ? 'ok\n' : 'sick\n');
    return;
  }
  if (req.url === '/sick') {
    healthy = false;
    res.end('now sick\n');
    return;
  }
  if (req.url === '/count') {
    res.end(String(count - 1));
    return;
  }
  if (req.url === '/sink') {
    let n = 0;
    req.on('data', (c) => { n += c.length; });
    req.on('end', () => res.end(String(n)));
    return;
  }
  if (req.url.startsWith('/bytes/')) {
    let left = Number(req.url.slice('/bytes/'.length));
    const chunk = Buffer.alloc(64 * 1024, 120);
    res.setHeader('content-length', String(left));
    const pump = () => {
      while (left > 0) {
        const c = left >= chunk.length ? chunk : chunk.subarray(0, left);
        left -= c.length;
        if (!res.write(c)) { res.once('drain', pump); return; }
      }
      res.end();
    };
    pump();
    return;
  }
  if (req.url.startsWith('/stall/')) {
    const ms = Number(req.url.slice('/stall/'.length));
    res.write('first chunk\n');
    setTimeout(() => res.end('late chunk\n'), ms);
    return;
  }
  if (!req.url.startsWith('/hello')) {
    res.statusCode = 404;
    res.end(`no route for ${req.url}\n`);
    return;
  }
  const hosts = [];
  for (let i = 0; i < req.rawHeaders.length; i += 2) {
    if (req.rawHeaders[i].toLowerCase() === 'host') hosts.push(req.rawHeaders[i + 1]);
  }
  res.setHeader('content-type', 'application/json');
  res.end(JSON.stringify({
    app: 'node',
    method: req.method,
    url: req.url,
    hosts,
    version: req.httpVersion,
    xfcc: req.headers['x-forwarded-client-cert'] || null,
    connection: req.headers['connection'] || null,
    forwarded_for: req.headers['x-forwarded-for'] || null,
    forwarded_proto: req.headers['x-forwarded-proto'] || null,
    mesh_debug: req.headers['x-mesh-debug'] || null,
  }));
});
server.on('connection', (socket) => {
  socket.on('end', () => { socket.endedByCaller = true; });
  socket.on('close', () => {
    if (!socket.counted) return;
    conns.closed += 1;
    if (socket.endedByCaller) conns.closed_by_caller += 1;
  });
});
server.listen(0, '127.0.0.1', () => {
  const a = server.address();
  console.log(JSON.stringify({ event: 'ready', addr: `${a.address}:${a.port}` }));
});
