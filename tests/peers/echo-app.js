// An app written with Node.js's own `http` module and its defaults (which refuse an HTTP/1.1
// request without Host, and see an absolute-form target as the URL): what a real Node app
// receives. Routes: /hello answers 200 with what the request looked like, as JSON; /count
// answers how many requests arrived; anything else 404. Prints one JSON readiness line.
const http = require('http');
let count = 0;
const server = http.createServer((req, res) => {
  count += 1;
  if (req.url === '/count') {
    res.end(String(count - 1));
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
  }));
});
server.listen(0, '127.0.0.1', () => {
  const a = server.address();
  console.log(JSON.stringify({ event: 'ready', addr: `${a.address}:${a.port}` }));
});
