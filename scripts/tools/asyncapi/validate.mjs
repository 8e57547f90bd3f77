// Validates an AsyncAPI document (YAML or JSON file) with the official parser: prints every
// diagnostic, exits 1 when the document has errors or cannot be parsed, 2 on bad usage.
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const file = process.argv[2];
if (!file) {
  console.error('usage: node validate.mjs DOCUMENT');
  process.exit(2);
}
const severity = ['error', 'warning', 'information', 'hint'];
const text = await readFile(file, 'utf8');
const { document, diagnostics } = await new Parser().parse(text);
for (const d of diagnostics) {
  console.log(`${severity[d.severity] ?? d.severity}: ${d.code}: ${d.message} (at ${d.path.join('.') || '/'})`);
}
const errors = diagnostics.filter((d) => d.severity === 0);
if (!document || errors.length > 0) {
  console.log(`invalid: ${errors.length} error(s)`);
  process.exit(1);
}
console.log(
  `valid AsyncAPI ${document.version()}: ${document.channels().length} channels, ` +
    `${document.operations().length} operations, ${document.components().messages().length} messages`,
);
