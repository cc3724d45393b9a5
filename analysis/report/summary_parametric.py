"""Approach 3 (analysis.fit.parametric) in summary.md and summary.json, and how its N_opt
exponent compares with approach 2's (analysis.fit.isoflop)."""

from __future__ import annotations

from analysis.fit import parametric as P
from analysis.report.summary_sections import md_table, num


def comparison(par: dict, optimal: dict) -> dict | None:
    """Approach 3's exponent minus approach 2's, and whether their intervals overlap; None
    when either has no exponent."""
    fit = optimal.get("fit")
    if not par.get("ok") or fit is None or par.get("exponent") is None:
        return None
    e3, e2 = par["exponent"], fit["exponent"]
    iv3, iv2 = par.get("interval"), fit["interval"]
    overlap = (None if iv3 is None else bool(iv3[0] <= iv2[1] and iv2[0] <= iv3[1]))
    return {"isoflop_exponent": e2, "isoflop_interval": list(iv2), "difference": e3 - e2,
            "intervals_overlap": overlap}


def parametric_json(par: dict, optimal: dict) -> dict:
    """summary.json `parametric`: params, intervals, at_bound, exponent, interval (null with a
    reason when there is no fit) and the comparison with approach 2."""
    keys = ("params", "intervals", "at_bound", "exponent", "interval")
    out = {"method": P.METHOD, "law": P.LAW, **{k: par.get(k) for k in keys},
           "n_points": par.get("n_points", 0), "n_clusters": par.get("n_clusters"),
           "n_boot": par.get("n_boot"), "n_boot_ok": par.get("n_boot_ok"),
           "macs_per_param": par.get("macs_per_param"), "rmse_log": par.get("rmse_log"),
           "comparison": comparison(par, optimal), "reason": par.get("reason")}
    if not par.get("ok"):
        out["at_bound"] = []
    return out


def _agreement(cmp: dict | None, level: int) -> str:
    """One sentence on the two approaches' exponents."""
    if cmp is None:
        return ("Approach 2 (IsoFLOP profiles) has no exponent to compare with (see its "
                "section).")
    d, iv2 = cmp["difference"], cmp["isoflop_interval"]
    verdict = {True: "their intervals overlap: the two approaches agree within them",
               False: "their intervals do not overlap: the two approaches disagree",
               None: "approach 3 has no interval to compare"}[cmp["intervals_overlap"]]
    return (f"Approach 2 (IsoFLOP profiles) gives a = {cmp['isoflop_exponent']:.3f} "
            f"[{iv2[0]:.3f}, {iv2[1]:.3f}] ({level}% interval); approach 3 minus approach 2 = "
            f"{d:+.3f}; {verdict}.")


def parametric_section(par: dict, optimal: dict) -> list[str]:
    """The fitted constants with bootstrap intervals, N_opt's exponent and the comparison."""
    out = ["## Compute-optimal model size (parametric fit, approach 3)", "",
           (f"{P.LAW} (Hoffmann et al. 2022, Sec. 3.3), N in parameters, D in images seen, "
            "fitted with the Huber loss (delta 1e-3) of log-error from a grid of starts "
            "(Besiroglu et al. 2024) to every recipe's final eval, seeds averaged."), ""]
    if not par.get("ok"):
        return out + [f"No fit: {par['reason']}.", ""]
    level = round(100 * par["level"])
    iv = par["intervals"]
    cells = [f"{num(par['params'][k], '.4g')}"
             + (f" [{num(iv[k][0], '.4g')}, {num(iv[k][1], '.4g')}]" if iv else "")
             for k in P.PARAMS]
    out += md_table([f"{k} [{level}% bootstrap]" for k in P.PARAMS], [cells])
    e, ei = par["exponent"], par["interval"]
    ei_text = f" [{ei[0]:.3f}, {ei[1]:.3f}]" if ei else " (no interval)"
    m = par.get("macs_per_param")
    out += ["", (f"{par['n_points']} points in {par['n_clusters']} resampling units (the "
                 "branches of one trunk are one unit); "
                 f"{par['n_boot_ok']}/{par['n_boot']} bootstrap refits; RMS log-residual "
                 f"{num(par['rmse_log'])}."),
            (f"N_opt ∝ C^(beta / (alpha + beta)) = C^{e:.3f}{ei_text} ({level}% bootstrap), "
             "with C = 6 x MACs/image x D and MACs/image = m N"
             + (f" (m = {num(m)} MACs per parameter, the runs' median)." if m else "."))]
    if par["at_bound"]:
        out.append(f"At a bound (within 1 % of its range in the fit, or in >= 5 % of the "
                   f"refits): {', '.join(par['at_bound'])}; the fit is not determined by "
                   "these runs: read N_opt's exponent with care.")
    return out + [_agreement(comparison(par, optimal), level), ""]

