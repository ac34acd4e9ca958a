// Shared pieces of the scheduler ports: the training noise schedule (betas, alphas_cumprod, sigmas), the inference
// timestep spacings, and the numpy helpers they rely on. Mirrors diffusers 0.42.1 (schedulers/scheduling_ddim.py:
// betas_for_alpha_bar, rescale_zero_terminal_snr) with torch 2.x CPU / numpy 2.x semantics.
//
// Numbers are JS float64 throughout; where diffusers keeps a value in float32 (betas, alphas_cumprod, sigmas,
// float32 timesteps) it is rounded with Math.fround after each operation torch rounds, so the schedule matches torch
// to the bit or the ulp (torch's vectorized float32 sqrt, AVX-512 at least, is not always correctly rounded):
// - torch.linspace(dtype=float32) computes start + step * i in one fused multiply-add (end - step * (n - 1 - i) for
//   the second half); the JS rounds the float64 result once, which matches except for rare double-rounding cases.
// - torch.cumprod on CPU accumulates float32 products in float64 and rounds each output; the JS does the same (a
//   float32 running product would drift by ~6e-5 relative at t = 999).
// The step formulas (in the scheduler modules) are computed in float64 and stored as float32: a deliberate deviation
// of ~1e-7 relative from torch's float32 arithmetic.

export const f32 = Math.fround;

/** The training-schedule defaults every diffusers scheduler's __init__ has (0.42.1): the start of each DEFAULTS. */
export const SCHEDULE_DEFAULTS = Object.freeze({
  num_train_timesteps: 1000,
  beta_start: 0.0001,
  beta_end: 0.02,
  beta_schedule: "linear",
  trained_betas: null,
});

/** Throws an Error with `message` when `condition` holds: the ports refuse options they do not implement. */
export function refuse(condition, message) {
  if (condition) throw new Error(message);
}

/** The config a diffusers class builds from `config` (as `from_config`): its own keys, defaults for the rest. */
export function pickConfig(defaults, config) {
  const out = { ...defaults };
  for (const key of Object.keys(defaults)) if (config[key] !== undefined) out[key] = config[key];
  return out;
}

/** numpy's round (half to even). */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** numpy.linspace(a, b, n) in float64: a + i * step, the last element exactly b. */
export function linspace(a, b, n) {
  if (n === 1) return [a];
  const step = (b - a) / (n - 1);
  return Array.from({ length: n }, (_, i) => (i === n - 1 ? b : i * step + a));
}

/** numpy.arange(start, stop, step) for floats: ceil((stop - start) / step) values start + i * delta. */
export function arange(start, stop, step) {
  const length = Math.max(0, Math.ceil((stop - start) / step));
  const delta = start + step - start;
  return Array.from({ length }, (_, i) => (i === 0 ? start : i === 1 ? start + step : start + i * delta));
}

/** numpy.interp(x, [0, 1, ..., fp.length - 1], fp). */
export function interp(x, fp) {
  const last = fp.length - 1;
  if (x <= 0) return fp[0];
  if (x >= last) return fp[last];
  const j = Math.floor(x);
  if (x === j) return fp[j];
  return (fp[j + 1] - fp[j]) * (x - j) + fp[j];
}

function torchLinspace32(start, end, n) {
  const [a, b] = [f32(start), f32(end)];
  const step = f32((b - a) / (n - 1));
  const half = Math.floor(n / 2);
  return Float64Array.from({ length: n }, (_, i) => f32(i < half ? a + step * i : b - step * (n - 1 - i)));
}

function betasForAlphaBar(n, maxBeta = 0.999) {
  const alphaBar = (t) => Math.cos(((t + 0.008) / 1.008) * Math.PI / 2) ** 2;
  return Float64Array.from({ length: n }, (_, i) => f32(Math.min(1 - alphaBar((i + 1) / n) / alphaBar(i / n), maxBeta)));
}

/** torch.cumprod of float32 values: float64 accumulation, each output rounded to float32. */
export function cumprod32(values) {
  let acc = 1;
  return values.map((v) => f32((acc *= v)));
}

/** diffusers' rescale_zero_terminal_snr (arXiv 2305.08891, Algorithm 1), float32 step by step. */
export function rescaleZeroTerminalSnr(betas) {
  const sqrtBar = cumprod32(betas.map((b) => f32(1 - b))).map((a) => f32(Math.sqrt(a)));
  const [first, last] = [sqrtBar[0], sqrtBar[sqrtBar.length - 1]];
  const scale = f32(first / f32(first - last));
  const bar = sqrtBar.map((s) => f32(f32(s - last) * scale)).map((s) => f32(s * s));
  return bar.map((a, i) => f32(1 - (i === 0 ? a : f32(a / bar[i - 1]))));
}

/** Betas from a scheduler config (`trained_betas`, or `beta_schedule` linear / scaled_linear / squaredcos_cap_v2). */
export function betasFromConfig(c) {
  let betas;
  if (c.trained_betas != null) betas = Float64Array.from(c.trained_betas, f32);
  else if (c.beta_schedule === "linear") betas = torchLinspace32(c.beta_start, c.beta_end, c.num_train_timesteps);
  else if (c.beta_schedule === "scaled_linear") {
    betas = torchLinspace32(Math.sqrt(c.beta_start), Math.sqrt(c.beta_end), c.num_train_timesteps).map((b) => f32(b * b));
  } else if (c.beta_schedule === "squaredcos_cap_v2") betas = betasForAlphaBar(c.num_train_timesteps);
  else throw new Error(`beta_schedule ${c.beta_schedule} is not supported: use linear, scaled_linear or squaredcos_cap_v2`);
  return c.rescale_betas_zero_snr ? rescaleZeroTerminalSnr(betas) : betas;
}

/** alphas_cumprod for a config, as float32 values (Float64Array). */
export function alphasCumprodFromConfig(c) {
  return cumprod32(betasFromConfig(c).map((b) => f32(1 - b)));
}

/** Karras-style sigmas sqrt((1 - a) / a) per training timestep, in float32 like torch. */
export function trainSigmas(alphasCumprod) {
  return alphasCumprod.map((a) => f32(Math.sqrt(f32(f32(1 - a) / a))));
}

/**
 * Inference timesteps, descending, as DDIM / Euler / PNDM space them (`timestep_spacing` leading, trailing, linspace).
 * linspace values are left unrounded when `roundLinspace` is false (Euler keeps them as float32).
 */
export function spacedTimesteps(c, n, roundLinspace = true) {
  const T = c.num_train_timesteps;
  if (c.timestep_spacing === "linspace") {
    const ts = linspace(0, T - 1, n).reverse();
    return roundLinspace ? ts.map(roundHalfEven) : ts;
  }
  if (c.timestep_spacing === "leading") {
    const ratio = Math.floor(T / n);
    return Array.from({ length: n }, (_, i) => (n - 1 - i) * ratio + c.steps_offset);
  }
  if (c.timestep_spacing === "trailing") return arange(T, 0, -T / n).map((t) => roundHalfEven(t) - 1);
  throw new Error(`timestep_spacing ${c.timestep_spacing} is not supported: use leading, trailing or linspace`);
}
