"""Whether the frontier law is determined (analysis.fit.determined), for summary.md and
summary.json. The text has no number in C's unit, so it reads the same for any unit of C."""

from __future__ import annotations

from analysis.fit import determined as D


def verdict_lines(result: dict) -> list[str]:
    """summary.md lines saying whether the law is determined by these points, and why not."""
    det = result["determination"]
    level = round(100 * result["boot"]["level"])
    band = (f"the {level}% bootstrap band is {100 * det['band']['at_max']:.0f}% of the prediction "
            f"wide at the largest compute and {100 * det['band']['at_10x']:.0f}% at "
            f"{D.EXTRAPOLATE:g}x beyond it (limits {100 * D.BAND_AT_MAX:.0f}% and "
            f"{100 * D.BAND_AT_10X:.0f}%)")
    where = f"{det['n_points']} frontier points over {det['decades']:.2f} decades of compute"
    if det["determined"]:
        return [(f"**Law determined** by {where}: no constant at a bound of the search or "
                 f"loose; {band}.")]
    out = [(f"**Law not determined** by {where}; read the curve as a description of the data, "
            "not a law to extrapolate:")]
    out += [f"- {r}" for r in det["reasons"]]
    if not any("band" in r for r in det["reasons"]):
        out.append(f"- within the limits: {band}")
    return out


def extrapolation_claim(result: dict) -> str | None:
    """Why the hold-out check must not be read as a claim about extrapolation, or None."""
    det = result.get("determination") if result.get("ok") else None
    if det is None or det["too_little"] is None:
        return None
    return (f"no extrapolation claim: too little data ({det['too_little']}); the check is shown "
            "for what it is worth")


def determination_json(result: dict) -> dict:
    """summary.json's fit.at_bound, fit.determined and fit.determination (schema:
    analysis/README.md)."""
    det = result.get("determination") if result.get("ok") else None
    if det is None:
        return {"at_bound": [], "determined": False, "determination": None}
    return {"at_bound": det["at_bound"], "determined": det["determined"],
            "determination": {"reasons": det["reasons"], "band_at_max": det["band"]["at_max"],
                              "band_at_10x": det["band"]["at_10x"],
                              "band_limits": [D.BAND_AT_MAX, D.BAND_AT_10X],
                              "n_points": det["n_points"], "min_points": D.MIN_POINTS,
                              "decades": det["decades"], "min_decades": D.MIN_DECADES,
                              "too_little_data": det["too_little"],
                              "at_bound_fraction": result["boot"].get("at_bound_frac", {})}}
