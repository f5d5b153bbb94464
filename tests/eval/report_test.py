"""The run table and its distillation diagnostics come from metrics.json."""

from evl_ecg_jax.eval import report


def _metrics(auc, **diag):
  return {"model": "cnn1d", "num_params": 1234, "validation/macro_auc": auc,
          "test/macro_auc": auc - 0.01, "test/auc/MI": auc,
          **{f"diag/{k.replace('__', '/')}": v for k, v in diag.items()}}


def test_tables_read_the_metrics():
  runs = {"ce": _metrics(0.8),
          "evl": _metrics(0.85, grad_share__ot=0.25, grad_share__kd=0.5,
                          grad_share__mhca_reconstruction=0.0,
                          teacher_grad_cos__ot=0.125, cka__pooled=0.75,
                          cka__pooled_shuffled=0.0625)}
  text = report.table(runs)
  assert "| evl | cnn1d | 1,234 | 0.8500 | 0.8400 | 0.850 |" in text
  diag = report.diagnostics_table(runs)
  lines = diag.splitlines()
  assert len(lines) == 3 and lines[2].startswith("| evl |")  # ce: no diag
  assert lines[0].split(" | ")[1:3] == ["grad share kd", "grad share ot"]
  cells = lines[2].strip("| ").split(" | ")
  assert cells[1:3] == ["0.500", "0.250"]  # grad share kd, ot
  assert cells[3:5] == ["–", "0.125"]  # shuffled-teacher cos kd (absent), ot
  assert cells[5:7] == ["0.750", "0.062"]  # CKA pooled, shuffled
  assert report.diagnostics_table({"ce": runs["ce"]}) == ""
