// Validate a .glb with the Khronos glTF validator (npm gltf-validator); prints its JSON report.
// Usage: node .ci/validate_gltf.mjs FILE.glb   (gltf-validator installed under .ci/node by .ci/run)
import { createRequire } from "module";
import { readFileSync } from "fs";
const require = createRequire(new URL("./node/", import.meta.url));
const validator = require("gltf-validator");
const data = new Uint8Array(readFileSync(process.argv[2]));
const report = await validator.validateBytes(data, { maxIssues: 100 });
console.log(JSON.stringify(report.issues));
