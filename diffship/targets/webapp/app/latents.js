// Initial latents: read from a .npy file (to compare the page with diffship's Python runtime on the same noise), or
// drawn from the page's own seeded generator (its numbers are not PyTorch's, so a seed gives a different image here).

/**
 * A float32 or float64 C-order array from .npy bytes: {data: Float32Array, shape: number[]}. The format is a magic
 * string, a header length and a Python-literal header (numpy's format docs); it is parsed here rather than through a
 * package because the page reads exactly one dtype and layout.
 */
export function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const magic = String.fromCharCode(...bytes.slice(1, 6));
  if (bytes[0] !== 0x93 || magic !== "NUMPY") throw new Error("not a .npy file");
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.slice(start, start + headerLength));
  const descr = /'descr':\s*'([^']+)'/.exec(header)?.[1];
  const fortran = /'fortran_order':\s*True/.test(header);
  const shape = (/'shape':\s*\(([^)]*)\)/.exec(header)?.[1] ?? "").split(",").map((s) => s.trim()).filter(Boolean)
    .map(Number);
  if (fortran) throw new Error(".npy latents must be in C order");
  const offset = start + headerLength;
  const count = shape.reduce((a, b) => a * b, 1);
  if (descr === "<f4") return { data: new Float32Array(buffer.slice(offset, offset + 4 * count)), shape };
  if (descr === "<f8") return { data: Float32Array.from(new Float64Array(buffer.slice(offset, offset + 8 * count))), shape };
  throw new Error(`.npy latents must be little-endian float32 or float64, not ${descr}`);
}

/** `count` standard normal values from `seed` (mulberry32 uniforms, Box-Muller). */
export function seededNormal(seed, count) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const out = new Float32Array(count);
  for (let i = 0; i < count; i += 2) {
    const u = Math.max(uniform(), 1e-12);
    const v = uniform();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v);
    if (i + 1 < count) out[i + 1] = r * Math.sin(2 * Math.PI * v);
  }
  return out;
}
