// The page: picks WebGPU or WASM, loads the pipeline, and generates from the form or from URL parameters.
// Automation interface (kept stable for release pipelines): ?prompt=&negative_prompt=&seed=&steps=&guidance=
// [&latents=URL of a .npy][&ep=webgpu|wasm][&autorun=1]. With autorun=1 the page generates at once and puts the
// image in <img id="result"> as a PNG data URL; <body data-state> becomes "done" (or "error"), and <pre id="timings">
// holds the run's JSON: backend, milliseconds per step, total.
import * as ort from "./runtime/ort.webgpu.min.mjs";
import { Tokenizer } from "./runtime/tokenizers.min.mjs";
import { loadPipeline, generate } from "./pipeline.js";
import { parseNpy } from "./latents.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function fail(error) {
  document.body.dataset.state = "error";
  $("status").textContent = `Error: ${error.message ?? error}`;
  console.error(error);
}

/** The execution provider to use and why, or {ep: null, why} when this build cannot run in this browser. */
async function chooseBackend(config, forced) {
  if (forced === "wasm") {
    return config.wasm ? { ep: "wasm", why: "WASM, as asked (ep=wasm)" }
      : { ep: null, why: "this FP16 build is for WebGPU only; WASM cannot run it" };
  }
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
  if (adapter) {
    const info = adapter.info ?? {};
    const name = [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unnamed adapter";
    if (config.webgpu_needs_shader_f16 && !adapter.features.has("shader-f16")) {
      return { ep: null, why: `this FP16 build needs WebGPU's shader-f16 feature, which this adapter (${name}) lacks: `
        + "it needs a real GPU; build web:fp32 for WASM" };
    }
    return { ep: "webgpu", why: `WebGPU (${name})` };
  }
  if (forced === "webgpu") return { ep: null, why: "WebGPU was asked for (ep=webgpu) but this browser has no adapter" };
  return config.wasm ? { ep: "wasm", why: "WASM (this browser has no WebGPU adapter)" }
    : { ep: null, why: "this FP16 build needs WebGPU, which this browser does not have" };
}

async function latentsFromInputs() {
  const file = $("latents").files[0];
  if (file) return parseNpy(await file.arrayBuffer()).data;
  const url = params.get("latents");
  if (!url) return null;
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return parseNpy(await response.arrayBuffer()).data;
}

async function run(pipeline, backend) {
  document.body.dataset.state = "running";
  $("generate").disabled = true;
  const steps = Number($("steps").value);
  $("progress").max = steps;
  $("progress").value = 0;
  const result = await generate(pipeline, {
    prompt: $("prompt").value, negativePrompt: $("negative_prompt").value, steps,
    guidance: Number($("guidance").value), seed: Number($("seed").value), latents: await latentsFromInputs(),
    onStep: (done, total, ms) => {
      $("progress").value = done;
      $("status").textContent = `step ${done} / ${total}`;
      $("step-time").textContent = `${ms.toFixed(0)} ms per step (${backend.ep})`;
    },
  });
  const canvas = $("canvas");
  canvas.width = result.width;
  canvas.height = result.height;
  canvas.getContext("2d").putImageData(new ImageData(result.pixels, result.width, result.height), 0, 0);
  $("result").src = canvas.toDataURL("image/png");
  const mean = result.stepMs.reduce((a, b) => a + b, 0) / result.stepMs.length;
  $("status").textContent = `done in ${(result.totalMs / 1000).toFixed(1)} s, ${mean.toFixed(0)} ms per step`;
  $("timings").textContent = JSON.stringify({ backend: backend.ep, backend_detail: backend.why, step_ms: result.stepMs,
    total_ms: result.totalMs, width: result.width, height: result.height });
  document.body.dataset.state = "done";
  $("generate").disabled = false;
}

async function main() {
  const base = new URL(".", location.href).href;
  const config = await (await fetch(`${base}diffship-web.json`)).json();
  $("title").textContent = `${config.title}, ${config.precision.toUpperCase()}, ${config.image[1]}x${config.image[0]}`;
  for (const name of ["prompt", "negative_prompt", "seed", "steps", "guidance"]) {
    if (params.has(name)) $(name).value = params.get(name);
  }
  const backend = await chooseBackend(config, params.get("ep"));
  $("backend").textContent = backend.ep ? `Running on ${backend.why}.` : `Cannot run here: ${backend.why}.`;
  document.body.dataset.backend = backend.ep ?? "none";
  if (!backend.ep) throw new Error(backend.why);
  ort.env.wasm.wasmPaths = new URL(config.runtime.wasm_paths, base).href;
  if (!self.crossOriginIsolated) ort.env.wasm.numThreads = 1; // threads need COOP/COEP headers from the server
  const pipeline = await loadPipeline(base, ort, Tokenizer, backend.ep, (text) => { $("status").textContent = text; });
  $("status").textContent = "ready";
  document.body.dataset.state = "ready";
  $("generate").disabled = false;
  $("form").addEventListener("submit", (event) => {
    event.preventDefault();
    run(pipeline, backend).catch(fail);
  });
  if (params.get("autorun") === "1") await run(pipeline, backend);
}

main().catch(fail);
