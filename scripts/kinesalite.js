// Starts kinesalite, an in-memory Kinesis emulator, on 127.0.0.1 only (its
// own command line listens on every interface). For the tests: `node
// scripts/kinesalite.js PORT`, with NODE_PATH naming where scripts/test
// installed it. Streams are created, split and merged at once.
const kinesalite = require('kinesalite');
const port = Number(process.argv[2] || 4567);
const server = kinesalite({ createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 50 });
server.listen(port, '127.0.0.1', () => console.log(`kinesalite on 127.0.0.1:${port}`));
