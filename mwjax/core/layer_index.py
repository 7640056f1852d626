"""Layer numbers: mwjax and HF count decoder layers from 0 (`model.layers[i]`), the papers from 1.

One range check and one label, so that every message names a layer the same way. No mwjax imports:
masks, interventions and the config use these below the models.
"""

from __future__ import annotations

from typing import Protocol


class _HasLayers(Protocol):
    num_hidden_layers: int


def layer_numbers(layer: int) -> str:
    """'12 (HF layers[11])' for the 0-based `layer` 11: the papers' number, then HF's index.

    Args:
      layer: the 0-based decoder layer (HF `model.layers[layer]`).

    Returns:
      "{layer + 1} (HF layers[{layer}])".
    """
    return f"{layer + 1} (HF layers[{layer}])"


def layer_label(layer: int) -> str:
    """'layer 12 (HF layers[11])' for the 0-based `layer` 11 (HF `model.layers[11]`).

    Args:
      layer: the 0-based decoder layer.

    Returns:
      "layer " followed by `layer_numbers(layer)`.
    """
    return f"layer {layer_numbers(layer)}"


def check_layer(num_layers: int | _HasLayers, layer: int, what: str | None = None) -> int:
    """`layer` as an int if 0 <= layer < num_layers, else a ValueError naming the valid range.

    A `layer` equal to the count (most likely the papers' 1-based number of the last layer) gets a hint saying so.

    Args:
      num_layers: a count or a config with `num_hidden_layers` (HF `config.num_hidden_layers`).
      layer: the 0-based layer to check.
      what: how the message names the layer, e.g. "ffn_masks: layer 7" (default "layer {layer}").

    Returns:
      `int(layer)`.
    """
    n = num_layers if isinstance(num_layers, int) else num_layers.num_hidden_layers
    if not 0 <= int(layer) < n:
        # layer == n is most likely the papers' 1-based number of the last layer
        hint = f" (0-based as in HF: the papers' layer {n} is {n - 1})" if int(layer) == n else ""
        raise ValueError(f"{what or f'layer {layer}'} is out of range: the model has layers 0..{n - 1}{hint}")
    return int(layer)
