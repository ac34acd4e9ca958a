// Picks and builds a scheduler from a diffusers folder's scheduler_config.json, as diffship's Python runtime means to
// (diffship/runtime/schedulers.py: `OtherScheduler.from_config(pipe.scheduler.config, **overrides)`): the training
// schedule (betas, prediction type, offsets) carries over and only the sampler changes. Ports of diffusers 0.42.1.
// As in from_config, only the keys the file has carry over: a key it lacks takes the new class's default, not the
// folder class's (diffusers drops the folder class's defaults through `_use_default_values`).

import { DDIMScheduler } from "./ddim.js";
import { DPMSolverMultistepScheduler } from "./dpmsolver.js";
import { EulerDiscreteScheduler } from "./euler.js";
import { PNDMScheduler } from "./pndm.js";

const CLASSES = { DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler };

/** Common names (as diffship's Python NAMES) -> [diffusers class, config overrides]. */
export const NAMES = Object.freeze({
  ddim: ["DDIMScheduler", {}],
  euler: ["EulerDiscreteScheduler", {}],
  "dpm++2m": ["DPMSolverMultistepScheduler", {}],
  "dpm++2m-karras": ["DPMSolverMultistepScheduler", { use_karras_sigmas: true }],
  pndm: ["PNDMScheduler", {}],
});

/** The diffusers scheduler classes this port implements (their `_class_name`s). */
export const SUPPORTED = Object.freeze(Object.keys(CLASSES));

/**
 * A scheduler for a folder's scheduler config: its own class (`config._class_name`), or `name`'s (a common name such
 * as "dpm++2m-karras", or a class name). Keys the class does not know are ignored; missing ones
 * take its defaults.
 * @param {object} config the parsed scheduler_config.json
 * @param {string|null} name a common name or class name; null for the folder's own scheduler
 * @returns {DDIMScheduler|EulerDiscreteScheduler|DPMSolverMultistepScheduler|PNDMScheduler}
 * @throws {Error} naming the supported schedulers, for an unknown class or name
 */
export function makeScheduler(config, name = null) {
  const named = name && Object.hasOwn(NAMES, name) ? NAMES[name] : [name, {}];
  const [className, overrides] = name ? named : [config._class_name, {}];
  const cls = Object.hasOwn(CLASSES, className) ? CLASSES[className] : null;
  if (!cls) {
    const what = name ? `scheduler ${JSON.stringify(name)}` : `scheduler class ${JSON.stringify(className)}`;
    throw new Error(`Unsupported ${what}: use one of ${Object.keys(NAMES).join(", ")} `
      + `or a class among ${SUPPORTED.join(", ")}`);
  }
  return new cls({ ...config, ...overrides });
}
