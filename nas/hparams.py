"""TensorBoard HParams records of a search: the architecture decisions as hyperparameter columns.

Written as protobufs for tensorboardX's writer: tensorboard's own `hparams.summary` helpers need
TensorFlow (not a dependency), and tensorboardX's `add_hparams` writes one extra run per call and
declares no discrete domains, which TensorBoard's filter needs.
"""

from __future__ import annotations

from typing import Sequence

from google.protobuf.struct_pb2 import ListValue
from tensorboardX.proto.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName, Status
from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData, SessionEndInfo, SessionStartInfo
from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata

from search_spaces.space import ALPHABET, Decision

INACTIVE_LABEL = "-"  # the value of a decision of an inactive layer
STATUSES = ("ok", "stopped", "failed", "infeasible")


def decision_values(decisions: Sequence[Decision], key: str) -> dict[str, str]:
    """The option label of every decision in an architecture key (`-` where the layer is inactive)."""
    values = {d.name: INACTIVE_LABEL for d in decisions}
    if key and len(key) == len(decisions):
        for d, ch in zip(decisions, key):
            idx = ALPHABET.find(ch)
            if 0 <= idx < len(d.labels):
                values[d.name] = d.labels[idx]
    return values


def experiment_summary(name: str, decisions: Sequence[Decision], metric_tags: Sequence[str],
                       created: float) -> Summary:
    """The HParams experiment: decision columns with discrete domains, then key/status, metrics."""
    infos = []
    for d in decisions:
        domain = ListValue()
        domain.extend(list(dict.fromkeys(list(d.labels) + ([INACTIVE_LABEL] if d.layer is not None else []))))
        infos.append(HParamInfo(name=d.name, type=DataType.Value("DATA_TYPE_STRING"), domain_discrete=domain))
    status = ListValue()
    status.extend(list(STATUSES))
    infos.append(HParamInfo(name="key", type=DataType.Value("DATA_TYPE_STRING")))
    infos.append(HParamInfo(name="status", type=DataType.Value("DATA_TYPE_STRING"), domain_discrete=status))
    metrics = [MetricInfo(name=MetricName(tag=t)) for t in metric_tags]
    exp = Experiment(name=name, hparam_infos=infos, metric_infos=metrics, time_created_secs=created)
    return _summary("_hparams_/experiment", experiment=exp)


def session_summaries(decisions: Sequence[Decision], key: str, status: str, start: float,
                      end: float) -> tuple[Summary, Summary]:
    """(session start, session end) of one trial: its decisions' labels, key and status."""
    ssi = SessionStartInfo(start_time_secs=start)
    for name, label in {**decision_values(decisions, key), "key": key or "?", "status": status}.items():
        ssi.hparams[name].string_value = label
    sei = SessionEndInfo(status=Status.Value("STATUS_SUCCESS" if status != "failed" else "STATUS_FAILURE"),
                         end_time_secs=end)
    return (_summary("_hparams_/session_start_info", session_start_info=ssi),
            _summary("_hparams_/session_end_info", session_end_info=sei))


def _summary(tag: str, **content) -> Summary:
    data = HParamsPluginData(version=0, **content)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams",
                                                                  content=data.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])
