"""Numbers from loaded results: the compute-optimal frontier, the saturating power law and its
bootstrap, IsoFLOP profiles, measurement noise, compute accounting and the fits' memo."""

from analysis.fit.law import (
                              bootstrap_fit,
                              extrapolation_check,
                              fit_saturating_power_law,
                              pareto_frontier,
                              predict,
)

__all__ = ["bootstrap_fit", "extrapolation_check", "fit_saturating_power_law", "pareto_frontier",
           "predict"]
