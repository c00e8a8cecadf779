"""A weight-sharing supernet for any declared space: one Flax module, every candidate as arrays.

`Supernet(space)` holds the largest choice of every decision: per layer slot (stage s, layer l)
separate weights per block type (`ds`, `mb`, the 1x1 `skip` shortcut), each at the largest
channel count, expansion, kernel and squeeze-and-excite width the space allows. A candidate is an
`Architecture` of that space turned into ARRAYS by `candidate(space, arch)`:

  channel masks    the first c channels of the stem, each stage, each expansion, SE and head
  kernel masks     a k x k window of the largest depthwise kernel (the window a SAME-padded k x k
                   convolution reads at that layer's input size: its centre, bar one corner case)
  branch           per slot, the index of (block, activation) under `lax.switch`: 'off' (a layer
                   beyond the candidate's depth, the identity), 'ds', 'mb', 'mb' without expansion,
                   'skip' identity, 'skip' shortcut; only the taken branch runs under `jit`
  residual, se_on  0/1 flags

So one compiled program serves every candidate of a space at one input resolution. `extract`
slices the stand-alone variables of one candidate for `search_spaces.model.build_model(arch)`,
which computes the same function (tests/test_supernet.py).

Channels are shared first-c; `channel_groups` lists every tensor axis that carries one shared set
of channels, so the trainer can re-order them by importance (`permute_channels`) without changing
the largest candidate's function.

Modules, one idea each (imports go structure <- candidates <- computation <- module; standalone and
channels read the structure):
  structure    the static layout: slots, largest widths, branches, kernel windows
  candidates   an Architecture as arrays; the largest / smallest architecture
  computation  the computation of one candidate (masked ops, `lax.switch` per slot and per kernel/width)
  module       the Flax module declaring the variables; NumPy initialisation
  standalone   stand-alone variables of one candidate for `build_model(arch)` (`extract`)
  channels     channel groups, importance and permutation
  trees        helpers over nested dicts addressed by key paths
"""

from search_spaces.supernet.candidates import Candidate, candidate, check_arch, extreme, slots_of, stack_candidates
from search_spaces.supernet.channels import ChannelGroup, channel_groups, channel_importance, permute_channels
from search_spaces.supernet.standalone import extract
from search_spaces.supernet.computation import forward
from search_spaces.supernet.structure import Layout, Slot, input_sizes, kernel_window, layout
from search_spaces.supernet.module import Supernet, initialize, variable_shapes

__all__ = [
    "Candidate", "ChannelGroup", "Layout", "Slot", "Supernet", "candidate", "channel_groups", "channel_importance",
    "check_arch", "extract", "extreme", "forward", "initialize", "input_sizes", "kernel_window", "layout",
    "permute_channels", "slots_of", "stack_candidates", "variable_shapes",
]
