// Text to image in the page, as diffship/runtime/pipeline.py (and diffusers' StableDiffusionPipeline) does it:
// CLIP tokenization padded to the model's length, the text encoder for the prompt and the negative prompt, the
// UNet on both halves of classifier-free guidance at once, the folder's own scheduler, the VAE decode.
import { makeScheduler } from "./schedulers/index.js";
import { seededNormal } from "./latents.js";

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

/** Load the folder's description, tokenizer, scheduler config and the three sessions on execution provider `ep`. */
export async function loadPipeline(base, ort, Tokenizer, ep, onStatus = () => {}) {
  const config = await fetchJson(`${base}diffship-web.json`);
  const tok = config.tokenizer;
  const tokenizer = new Tokenizer(await fetchJson(base + tok.json), await fetchJson(base + tok.config));
  const sessions = {};
  for (const name of ["text_encoder", "denoiser", "vae_decoder"]) {
    const c = config.components[name];
    onStatus(`loading ${name} (${(c.bytes / 1e6).toFixed(1)} MB) on ${ep} ...`);
    const folder = c.path.slice(0, c.path.lastIndexOf("/") + 1);
    const options = { executionProviders: [ep] };
    if (c.external_data.length) {
      options.externalData = c.external_data.map((file) => ({ path: file, data: base + folder + file }));
    }
    sessions[name] = await ort.InferenceSession.create(base + c.path, options);
  }
  return { ort, config, tokenizer, schedulerConfig: config.scheduler, sessions };
}

/** The token ids diffusers feeds the text encoder: BOS, the text cut to fit, EOS, then the pad token. */
export function tokenize(pipeline, text) {
  const { max_length: max, pad_id: pad, eos_id: eos } = pipeline.config.tokenizer;
  let ids = Array.from(pipeline.tokenizer.encode(text).ids);
  if (ids.length > max) ids = ids.slice(0, max - 1).concat([eos]);
  const out = new Int32Array(max).fill(pad);
  out.set(ids);
  return out;
}

async function encodeText(pipeline, text) {
  const { ort, sessions, config } = pipeline;
  const ids = tokenize(pipeline, text);
  const outputs = await sessions.text_encoder.run({ input_ids: new ort.Tensor("int32", ids, [1, ids.length]) });
  return outputs[config.hidden_state];
}

function concat(a, b) {
  const out = new Float32Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

/**
 * One image. `latents` (Float32Array in the UNet's latent shape) makes the result comparable with diffship's Python
 * runtime; without them the noise comes from `seed` (the page's own generator, not PyTorch's).
 * Returns {pixels: Uint8ClampedArray RGBA, width, height, stepMs: number[], totalMs}.
 */
export async function generate(pipeline, { prompt, negativePrompt = "", steps, guidance, seed = 0, latents = null,
  onStep = () => {} }) {
  const { ort, config, sessions } = pipeline;
  const started = performance.now();
  const shape = config.latents;
  const size = shape.reduce((a, b) => a * b, 1);
  const guided = config.denoiser_batch === 2 * shape[0];
  const cond = await encodeText(pipeline, prompt);
  const hidden = guided
    ? new ort.Tensor("float32", concat((await encodeText(pipeline, negativePrompt)).data, cond.data),
      [2 * cond.dims[0], ...cond.dims.slice(1)])
    : cond;
  const scheduler = makeScheduler(pipeline.schedulerConfig);
  scheduler.setTimesteps(steps);
  if (latents && latents.length !== size) throw new Error(`latents hold ${latents.length} values; this build takes ${shape.join("x")}`);
  let sample = (latents ? Float32Array.from(latents) : seededNormal(seed, size)).map((v) => v * scheduler.initNoiseSigma);
  const stepMs = [];
  for (const [i, t] of scheduler.timesteps.entries()) {
    const began = performance.now();
    const scaled = scheduler.scaleModelInput(sample, t);
    const batch = config.denoiser_batch;
    const out = await sessions.denoiser.run({
      sample: new ort.Tensor("float32", guided ? concat(scaled, scaled) : scaled, [batch, ...shape.slice(1)]),
      timestep: new ort.Tensor("float32", new Float32Array(batch).fill(t), [batch]),
      encoder_hidden_states: hidden,
    });
    const noise = Object.values(out)[0].data;
    let prediction = noise;
    if (guided) {
      prediction = new Float32Array(size);
      for (let j = 0; j < size; j++) prediction[j] = noise[j] + guidance * (noise[size + j] - noise[j]);
    }
    sample = scheduler.step(prediction, t, sample);
    stepMs.push(performance.now() - began);
    onStep(i + 1, scheduler.timesteps.length, stepMs[i]);
  }
  const { scaling_factor: scale, shift_factor: shift } = config.vae;
  const decoded = await sessions.vae_decoder.run({
    latent_sample: new ort.Tensor("float32", sample.map((v) => v / scale + (shift || 0)), shape),
  });
  const image = Object.values(decoded)[0];
  const [, , height, width] = image.dims;
  return { pixels: toRgba(image.data, height, width), width, height, stepMs, totalMs: performance.now() - started,
    latents: sample };
}

/** NCHW in [-1, 1] to RGBA bytes, rounded as diffusers' numpy_to_pil does ((x / 2 + 0.5) clipped, * 255, round). */
export function toRgba(data, height, width) {
  const plane = height * width;
  const out = new Uint8ClampedArray(plane * 4);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const v = Math.min(Math.max(data[c * plane + p] / 2 + 0.5, 0), 1);
      out[p * 4 + c] = Math.round(v * 255);
    }
    out[p * 4 + 3] = 255;
  }
  return out;
}
