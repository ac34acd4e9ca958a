// Runs the browser app's scheduler ports for tests/test_web_schedulers.py: reads a JSON request on stdin, writes the
// results as JSON on stdout. Request: {noise: number[], cases: [{id, mode, config, name, steps}]}, where mode is
//   "run"      the fake denoising loop (model output = 0.3 * scaled sample + sin(0.01 * t), in float32 like torch)
//   "schedule" timesteps / initNoiseSigma / sigmas for each step count in `steps`
//   "alphas"   alphas_cumprod of the config's training schedule (as DDIMScheduler builds it)
//   "error"    the message makeScheduler + setTimesteps(steps) throws (null when nothing throws)
// A case that throws otherwise gets {failed: stack}.

import { makeScheduler } from "../../diffship/targets/webapp/app/schedulers/index.js";

const f32 = Math.fround;

function run({ config, name, steps }, noise) {
  const s = makeScheduler(config, name);
  s.setTimesteps(steps);
  const sigma = s.initNoiseSigma;
  let latents = noise.map((x) => x * sigma);
  const samples = [];
  for (const t of s.timesteps) {
    const input = s.scaleModelInput(latents, t);
    const wave = f32(Math.sin(f32(f32(0.01) * t)));
    const eps = input.map((x) => f32(f32(0.3) * x) + wave);
    latents = s.step(eps, t, latents);
    samples.push(Array.from(latents));
  }
  return { timesteps: s.timesteps, initNoiseSigma: sigma, samples };
}

function schedule({ config, name, steps }) {
  const s = makeScheduler(config, name);
  return steps.map((n) => {
    s.setTimesteps(n);
    return { steps: n, timesteps: s.timesteps, initNoiseSigma: s.initNoiseSigma, sigmas: s.sigmas ?? null };
  });
}

function error({ config, name, steps }) {
  try {
    makeScheduler(config, name).setTimesteps(steps ?? 4);
    return null;
  } catch (e) {
    return String(e.message);
  }
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const request = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const noise = Float32Array.from(request.noise ?? []);
const results = {};
for (const c of request.cases) {
  try {
    if (c.mode === "run") results[c.id] = run(c, noise);
    else if (c.mode === "schedule") results[c.id] = schedule(c);
    else if (c.mode === "alphas") results[c.id] = Array.from(makeScheduler(c.config, "ddim").alphasCumprod);
    else if (c.mode === "error") results[c.id] = error(c);
    else throw new Error(`unknown mode ${c.mode}`);
  } catch (e) {
    results[c.id] = { failed: String(e.stack) }; // reported by the test of that case
  }
}
process.stdout.write(JSON.stringify(results));
