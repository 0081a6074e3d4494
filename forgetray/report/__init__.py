"""The sweep report (being split into modules; for now all of it is in `figures`)."""

from forgetray.report.figures import (Report, TrialData, _methods_table, _methods_text, build_report,  # noqa: F401
                                      default_out_dir, run_report)
