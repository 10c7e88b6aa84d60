// The same Node hello-world workers for every target of bench/node_cluster.py.
// Run directly (`node app.js`), it is a textbook cluster program: the primary forks
// NODE_WORKERS workers, which listen on PORT. Under balancer as cluster primary, it takes the
// worker path directly. With BENCH_READY=1 (balancer proxy mode, cluster off) it listens on a
// free loopback port and announces it with process.send.
const cluster = require('node:cluster');
const http = require('node:http');
const body = 'hello\n';
const handler = (req, res) => {
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': body.length });
  res.end(body);
};
if (process.env.BENCH_READY === '1') {
  const server = http.createServer(handler);
  server.listen(0, '127.0.0.1', () => process.send(`${server.address().port} ready`));
  process.on('message', (m) => { if (m && m.type === 'shutdown') server.close(() => process.exit(0)); });
  process.on('disconnect', () => process.exit(0));
} else if (cluster.isPrimary) {
  const n = Number(process.env.NODE_WORKERS || 2);
  for (let i = 0; i < n; i++) cluster.fork();
  process.on('SIGTERM', () => { for (const w of Object.values(cluster.workers)) w.kill(); process.exit(0); });
} else {
  http.createServer(handler).listen(Number(process.env.PORT || 8000), '127.0.0.1');
}
