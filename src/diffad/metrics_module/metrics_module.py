"""Anomaly-detection metrics as an ``evaluate`` module: image AUROC, image F1-max, pixel AUROC, AUPRO.

Loaded offline from inside the installed package (``diffad.metrics.load_metric()``, i.e.
``evaluate.load(<path of diffad/metrics_module>)``); ``evaluate`` runs the script named
after its folder, hence this file's name. A thin wrapper: the maths is
``diffad.metrics.compute_anomaly_metrics``.
"""

import datasets
import evaluate

import diffad.metrics

_CITATION = """\
@inproceedings{bergmann2020uninformed,
  title={Uninformed Students: Student-Teacher Anomaly Detection with Discriminative Latent Embeddings},
  author={Bergmann, Paul and Fauser, Michael and Sattlegger, David and Steger, Carsten},
  booktitle={CVPR}, year={2020}
}
"""

_DESCRIPTION = """\
Image- and pixel-level anomaly-detection metrics as reported on MVTec AD: image AUROC, the
best image F1 and its threshold, and, when anomaly maps and ground-truth masks are given,
pixel AUROC and AUPRO (per-region overlap integrated up to 30% pixel FPR, normalised).
"""

_KWARGS_DESCRIPTION = """
Args:
    scores (`list` of `float`): image anomaly scores (N,), higher = more anomalous.
    labels (`list` of `int`): 1 = defect, 0 = good (N,); both classes must occur.
    anomaly_maps (array (N, H, W), optional): per-pixel anomaly maps; passed to `compute`
        as a keyword (not stored in Arrow: it would be slow).
    masks (array (N, H, W), optional): ground-truth masks in {0, 1}; with `anomaly_maps`.
    max_fpr (`float`, optional): AUPRO's FPR limit, 0.3 by default.
Returns:
    image_auroc, image_f1_max, image_f1_threshold, and pixel_auroc, aupro with maps.
Examples:
    >>> from diffad.metrics import load_metric
    >>> metric = load_metric()
    >>> metric.compute(scores=[0.1, 0.9, 0.4], labels=[0, 1, 1])["image_auroc"]
    1.0
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AnomalyMetrics(evaluate.Metric):
    """``evaluate.Metric`` for anomaly detection (features ``scores`` and ``labels``)."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"scores": datasets.Value("float64"), "labels": datasets.Value("int64")}),
            reference_urls=["https://www.mvtec.com/company/research/datasets/mvtec-ad"],
        )

    def _compute(self, scores, labels, anomaly_maps=None, masks=None, max_fpr=0.3):
        return diffad.metrics.compute_anomaly_metrics(scores, labels, anomaly_maps, masks, max_fpr=max_fpr)
