#!/usr/bin/env python3
"""Print the markdown tables of one or more run_peers.sh runs.

usage: report.py RUN_DIR [RUN_DIR ...]
Each RUN_DIR holds results.jsonl and versions.txt. With REPEAT > 1 rounds in a
run, every figure is the median over the rounds (req/s also shows min-max).
With two or more runs, a run-to-run comparison of the headline numbers follows.
"""
import json
import statistics
import sys
from pathlib import Path

ORDER = ["direct", "nginx", "litellm", "proxypal"]


def load(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "results.jsonl").read_text().splitlines() if l.strip()]
    vf = Path(run_dir) / "versions.txt"
    return rows, (vf.read_text() if vf.exists() else "")


def key(t):
    return (ORDER.index(t) if t in ORDER else len(ORDER), t)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def f(x, nd=1):
    if x is None or (isinstance(x, float) and x != x):
        return "-"
    return f"{x:,.{nd}f}"


def ratio(x, base):
    if not x or not base:
        return "-"
    r = x / base
    return f"{r:.2f}x" if r >= 0.01 else f"1/{1 / r:,.0f}"


def mib(kb):
    return f"{kb / 1024:.0f}" if kb else "-"


def http_errors(w):
    return sum(w.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))


def agg_http(rows):
    """(target, conc) -> medians over rounds"""
    groups = {}
    for r in rows:
        if r["kind"] == "http":
            groups.setdefault((r["target"], r["conc"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        ok = [r for r in rs if r["wrk"].get("requests")]
        req = sum(r["wrk"]["requests"] for r in ok)
        rps = [r["wrk"]["rps"] for r in ok]
        out[k] = {
            "rounds": len(rs),
            "ok_rounds": len(ok),
            "rps": med(rps),
            "rps_min": min(rps) if rps else None,
            "rps_max": max(rps) if rps else None,
            "p50": med([r["wrk"]["p50_us"] / 1e3 for r in ok]),
            "p99": med([r["wrk"]["p99_us"] / 1e3 for r in ok]),
            "errors": sum(http_errors(r["wrk"]) for r in ok),
            "cpu_us": (sum(r["proxy_cpu_s"] for r in ok) * 1e6 / req) if req else None,
        }
    return out


def agg_stream(rows):
    """target -> medians over rounds"""
    groups = {}
    for r in rows:
        if r["kind"] == "stream":
            groups.setdefault(r["target"], []).append(r)
    out = {}
    for t, rs in groups.items():
        ttfb, tot, cerr = [], [], 0
        for r in rs:
            c = r.get("curl", {})
            for a, b, code in zip(c.get("ttfb_s", []), c.get("total_s", []), c.get("codes", [])):
                if code == "200":
                    ttfb.append(a * 1e3)
                    tot.append(b * 1e3)
                else:
                    cerr += 1
        ones = [r.get("one", {}) for r in rs]
        a = {
            "rounds": len(rs),
            "curl_n": sum(len(r.get("curl", {}).get("codes", [])) for r in rs),
            "curl_ttfb": med(ttfb),
            "curl_total": med(tot),
            "one_n": sum(o.get("n", 0) for o in ones),
            "one_ttfc": med([o.get("ttfc_p50") for o in ones if o.get("ok")]),
            "one_total": med([o.get("total_p50") for o in ones if o.get("ok")]),
            "one_errors": cerr + sum(o.get("errors", 0) for o in ones),
            "one_lag_p99": med([o.get("lag_p99") for o in ones if o.get("ok")]),
            "one_lag_max": max((o["lag_max"] for o in ones if o.get("ok") and "lag_max" in o), default=None),
            "one_lag_over_1ms": sum(o.get("lag_over_1ms", 0) for o in ones),
            "bursts": {},
        }
        for bn in (1, 2):
            bs = [b for r in rs for b in r.get("bursts", []) if b["burst"] == bn]
            if not bs:
                continue
            rr = [b["r"] for b in bs]
            good = [x for x in rr if x.get("ok")]
            errs = [x.get("first_error") for x in rr if x.get("first_error")]
            a["bursts"][bn] = {
                "n": rr[0].get("n", 0),
                "ttfc_p50": med([x["ttfc_p50"] for x in good]),
                "ttfc_p99": med([x["ttfc_p99"] for x in good]),
                "total_p50": med([x["total_p50"] for x in good]),
                "total_p99": med([x["total_p99"] for x in good]),
                "errors": sum(x.get("errors", 0) for x in rr),
                "first_error": errs[0] if errs else "",
                "ev_min": min((x.get("events_min", 0) for x in good), default=0),
                "ev_max": max((x.get("events_max", 0) for x in good), default=0),
                "cpu_s": med([b.get("proxy_cpu_s") for b in bs]),
                "lag_p99": med([x.get("lag_p99") for x in good]),
            }
        out[t] = a
    return out


def tables(rows):
    out = []
    http = agg_http(rows)
    proc = {(r["target"], r["phase"]): r for r in rows if r["kind"] == "proc"}
    stream = agg_stream(rows)
    fails = [r for r in rows if r["kind"] == "fail"]
    rounds = max([v["rounds"] for v in http.values()] + [v["rounds"] for v in stream.values()] + [1])
    medtxt = f" Median of {rounds} interleaved rounds." if rounds > 1 else ""

    out.append(f"Non-streaming: wrk POST /v1/chat/completions to mock A (nginx, ~400 B JSON).{medtxt}\n")
    out.append("| target | conc | req/s | vs direct | p50 ms | p99 ms | +p50 ms | errors | proxy CPU µs/req | proxy peak RSS MiB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (t, conc) in sorted(http, key=lambda k: (k[1], key(k[0]))):
        h = http[(t, conc)]
        b = http.get(("direct", conc), {})
        rng = f" ({f(h['rps_min'], 0)}–{f(h['rps_max'], 0)})" if h["ok_rounds"] > 1 else ""
        add = f(h['p50'] - b['p50'], 2) if (t != "direct" and h["p50"] is not None and b.get("p50") is not None) else "-"
        pr = proc.get((t, "http"), {})
        out.append(
            f"| {t} | {conc} | {f(h['rps'], 0)}{rng} | {ratio(h['rps'], b.get('rps'))} | {f(h['p50'], 2)} | {f(h['p99'], 2)} | "
            f"{add} | {h['errors'] if h['ok_rounds'] else 'no data'} | {f(h['cpu_us'], 0) if t != 'direct' else '-'} | "
            f"{mib(pr.get('hwm_kb'))} |"
        )
    out.append("")

    if stream:
        s0 = next(iter(stream.values()))
        out.append(f"Streaming, one at a time: mock B (20 chunks 10 ms apart, then [DONE]); ms.{medtxt}")
        out.append(f"curl = {s0['curl_n']} sequential `curl -N` (median time_starttransfer / time_total); "
                   f"1x = {s0['one_n']} sequential streams via sse-load (TTFC = first `data:` line)\n")
        out.append("| target | curl TTFB p50 | curl total p50 | 1x TTFC p50 | 1x total p50 | +TTFC p50 | +total p50 | chunk lag p99 / max | events > 1 ms late | errors | events/stream |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        d = stream.get("direct", {})
        for t in sorted(stream, key=key):
            st = stream[t]
            okd = t != "direct" and st["one_ttfc"] is not None and d.get("one_ttfc") is not None
            add_c = f"{st['one_ttfc'] - d['one_ttfc']:+.1f}" if okd else "-"
            add_t = f"{st['one_total'] - d['one_total']:+.1f}" if okd else "-"
            out.append(
                f"| {t} | {f(st['curl_ttfb'])} | {f(st['curl_total'])} | {f(st['one_ttfc'])} | {f(st['one_total'])} | "
                f"{add_c} | {add_t} | {f(st['one_lag_p99'], 2)} / {f(st['one_lag_max'], 2)} | {st['one_lag_over_1ms']} | "
                f"{st['one_errors']} | {proc.get((t, 'stream'), {}).get('smoke_events', '-')} |"
            )
        out.append("")
        nm = next((b["n"] for st in stream.values() for b in st["bursts"].values()), 0)
        out.append(f"Streaming, {nm} concurrent streams (sse-load, all opened at once); ms.{medtxt} "
                   "Burst 1 finds the proxy's upstream connection pool cold, burst 2 (1 s later) warm; "
                   "+ = added vs direct in the same burst\n")
        out.append("| target | burst | TTFC p50 / p99 | total p50 / p99 | +TTFC p50 | +total p50 / p99 | errors | events/stream | proxy CPU s | proxy peak RSS MiB |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for bn in (1, 2):
            for t in sorted(stream, key=key):
                bb = stream[t]["bursts"].get(bn)
                if not bb:
                    continue
                db = d.get("bursts", {}).get(bn, {}) if d else {}
                okd = t != "direct" and bb["ttfc_p50"] is not None and db.get("ttfc_p50") is not None
                add_c = f"{bb['ttfc_p50'] - db['ttfc_p50']:+,.1f}" if okd else "-"
                add_t = f"{bb['total_p50'] - db['total_p50']:+,.1f} / {bb['total_p99'] - db['total_p99']:+,.1f}" if okd else "-"
                ev = f"{bb['ev_min']}" if bb["ev_min"] == bb["ev_max"] else f"{bb['ev_min']}-{bb['ev_max']}"
                err = f"{bb['errors']}" + (f" ({bb['first_error']})" if bb["first_error"] else "")
                rss = mib(proc.get((t, "stream"), {}).get("hwm_kb")) if bn == 2 else ""
                out.append(
                    f"| {t} | {bn} | {f(bb['ttfc_p50'])} / {f(bb['ttfc_p99'])} | {f(bb['total_p50'])} / {f(bb['total_p99'])} | "
                    f"{add_c} | {add_t} | {err} | {ev} | {f(bb['cpu_s'], 2) if t != 'direct' else '-'} | {rss} |"
                )
        out.append("")

    out.append("Per target: start-up time to first good reply, idle RSS after start-up, "
               "Authorization seen by mock A over 30 requests (client-key = the client's own key reached it)\n")
    out.append("| target | ready s (http / stream) | idle RSS MiB | upstream keys seen |")
    out.append("|---|---:|---:|---|")
    for t in sorted({t for (t, _) in proc}, key=key):
        h = proc.get((t, "http"), {})
        s = proc.get((t, "stream"), {})
        ready = "-" if t == "direct" else f"{h.get('ready_s', '-')} / {s.get('ready_s', '-')}"
        out.append(f"| {t} | {ready} | {mib(h.get('rss_idle_kb'))} | {h.get('keys', '-')} |")
    audits = [r for r in rows if r["kind"] == "netaudit"]
    if audits:
        out.append("\nNetwork audit (BENCH_NETAUDIT=1): non-loopback lookups/connects tried: "
                   + ", ".join(f"{r['target']} {r['phase']} {r['events']}" for r in audits))
    for r in fails:
        out.append(f"\n**{r['target']} failed to start in phase {r['phase']}** (see logs/)")
    out.append("")
    return "\n".join(out)


def headline(rows):
    h = {}
    for (t, conc), a in agg_http(rows).items():
        if a["rps"] is None:
            continue
        h[(t, f"req/s c={conc}")] = a["rps"]
        h[(t, f"p50 ms c={conc}")] = a["p50"]
        if t != "direct":
            h[(t, f"proxy CPU µs/req c={conc}")] = a["cpu_us"]
    for t, a in agg_stream(rows).items():
        h[(t, "1x TTFC p50 ms")] = a["one_ttfc"]
        for bn, b in a["bursts"].items():
            h[(t, f"{b['n']}x burst {bn} TTFC p50 ms")] = b["ttfc_p50"]
            h[(t, f"{b['n']}x burst {bn} total p50 ms")] = b["total_p50"]
    return h


def summary(rows, target="proxypal", peer="nginx"):
    """key=value tokens for a one-line SUMMARY (run.sh); medians over rounds."""
    http, st = agg_http(rows), agg_stream(rows)
    out = {}

    def g(d, *ks):
        for k in ks:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    t64, p64, d64 = http.get((target, 64), {}), http.get((peer, 64), {}), http.get(("direct", 64), {})
    t1, d1 = http.get((target, 1), {}), http.get(("direct", 1), {})
    if t64.get("rps") and p64.get("rps"):
        out["c64_rps_ratio_vs_nginx"] = f"{t64['rps'] / p64['rps']:.2f}"
    if t64.get("rps") and d64.get("rps"):
        out["c64_rps_ratio_vs_direct"] = f"{t64['rps'] / d64['rps']:.2f}"
    if t64.get("cpu_us") is not None:
        out["cpu_us_per_req"] = f"{t64['cpu_us']:.0f}"
    if p64.get("cpu_us") is not None:
        out["nginx_cpu_us_per_req"] = f"{p64['cpu_us']:.0f}"
    if t1.get("p99") is not None and d1.get("p99") is not None:
        out["c1_p99_added_us"] = f"{(t1['p99'] - d1['p99']) * 1e3:.0f}"
    p90 = lambda h: med([r["wrk"]["p90_us"] for r in rows if r["kind"] == "http" and (r["target"], r["conc"]) == h and r["wrk"].get("requests")])
    if t1.get("p99") is not None and p90((target, 1)) is not None and p90(("direct", 1)) is not None:
        out["c1_p90_added_us"] = f"{p90((target, 1)) - p90(('direct', 1)):.0f}"
    if t1.get("p50") is not None and d1.get("p50") is not None:
        out["c1_p50_added_us"] = f"{(t1['p50'] - d1['p50']) * 1e3:.0f}"
    tc, dc, pc = g(st, target, "one_ttfc"), g(st, "direct", "one_ttfc"), g(st, peer, "one_ttfc")
    if tc is not None and dc is not None:
        out["ttfc_added_ms"] = f"{tc - dc:.2f}"
    if pc is not None and dc is not None:
        out["nginx_ttfc_added_ms"] = f"{pc - dc:.2f}"
    if g(st, target, "one_lag_max") is not None:
        out["chunk_lag_max_ms"] = f"{st[target]['one_lag_max']:.2f}"
    if not any(t == target for (t, _) in http) and target not in st:
        out[target] = "missing"
        return out
    errs = sum(v["errors"] for (t, _), v in http.items() if t == target)
    errs += g(st, target, "one_errors") or 0
    errs += sum(b["errors"] for b in (g(st, target, "bursts") or {}).values())
    out["errors"] = str(errs)
    return out


def main(argv):
    if argv and argv[0] == "--summary":
        rows, _ = load(argv[1])
        print(" ".join(f"{k}={v}" for k, v in summary(rows).items()))
        return 0
    if not argv:
        print(__doc__)
        return 2
    runs = []
    for d in argv:
        rows, versions = load(d)
        runs.append((d, rows))
        print(f"## Run {Path(d).name}\n")
        print("```\n" + versions.strip() + "\n```\n")
        print(tables(rows))
    if len(runs) > 1:
        heads = [headline(rows) for _, rows in runs]
        keys = sorted(set().union(*heads), key=lambda k: (key(k[0]), k[1]))
        print("## Run-to-run comparison\n")
        print("| target | metric | " + " | ".join(Path(d).name for d, _ in runs) + " | spread |")
        print("|---|---|" + "---:|" * len(runs) + "---:|")
        for k in keys:
            vals = [hd.get(k) for hd in heads]
            have = [v for v in vals if v]
            spread = f"{(max(have) - min(have)) / statistics.mean(have) * 100:.0f}%" if len(have) > 1 else "-"
            print(f"| {k[0]} | {k[1]} | " + " | ".join(f(v, 2 if ' ms' in k[1] else 0) for v in vals) + f" | {spread} |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
