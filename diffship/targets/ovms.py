"""OpenVINO Model Server's graph beside an OpenVINO set: `graph.pbtxt`, which its image endpoint reads.

OVMS serves `/v3/images/generations` from a MediaPipe graph of one ImageGenCalculator, which runs OpenVINO GenAI's
pipelines on the folder (model_server docs/image_generation/reference.md). Its `plugin_config` is the one place a
client applies runtime options from the folder itself, so the set's validated inference precision goes there.
"""

from __future__ import annotations

import json
from pathlib import Path

GRAPH = "graph.pbtxt"


def write_graph(set_dir: Path, properties: dict[str, str], device: str = "CPU") -> Path:
    """`graph.pbtxt` in `set_dir`: the ImageGenCalculator on this folder with `properties` as its plugin_config."""
    # protobuf's text format takes a JSON string in a C-escaped, double-quoted literal
    config = json.dumps(json.dumps(properties, sort_keys=True))
    text = f"""input_stream: "HTTP_REQUEST_PAYLOAD:input"
output_stream: "HTTP_RESPONSE_PAYLOAD:output"

node: {{
  name: "ImageGenExecutor"
  calculator: "ImageGenCalculator"
  input_stream: "HTTP_REQUEST_PAYLOAD:input"
  input_side_packet: "IMAGE_GEN_NODE_RESOURCES:pipes"
  output_stream: "HTTP_RESPONSE_PAYLOAD:output"
  node_options: {{
    [type.googleapis.com / mediapipe.ImageGenCalculatorOptions]: {{
      models_path: "./"
      device: "{device}"
      plugin_config: {config}
    }}
  }}
}}
"""
    path = set_dir / GRAPH
    path.write_text(text, encoding="utf-8")
    return path
