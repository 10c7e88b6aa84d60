"""Unit tests of the parts that read other programs' output (wrk's report, balancer's log,
`balancer --help`) and of the ratio arithmetic. No processes, no sockets:

    python3 -m unittest discover -s bench
"""

import unittest
from unittest import mock

import tempfile
from pathlib import Path
from types import SimpleNamespace

import accept_ab
import cost_report
import counts
import goals
import readme
import report
import soak
import targets
import wrk

WRK_OUTPUT = """Running 1s test @ http://127.0.0.1:40087/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    19.29ms   27.73ms 208.14ms   88.37%
    Req/Sec     2.27k     1.51k    4.48k    52.63%
  Latency Distribution
     50%  712.00us
     75%   19.56ms
     90%   52.46ms
     99%    1.37s
  4412 requests in 1.08s, 654.91KB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:   4103.34
Transfer/sec:    609.09KB
"""


class WrkTests(unittest.TestCase):
    def test_parses_report(self):
        r = wrk.parse(WRK_OUTPUT)
        self.assertEqual(r.requests, 4412)
        self.assertAlmostEqual(r.seconds, 1.08)
        self.assertAlmostEqual(r.rps, 4103.34)
        self.assertAlmostEqual(r.p50_ms, 0.712)
        self.assertAlmostEqual(r.p99_ms, 1370.0)
        self.assertEqual((r.socket_errors, r.non_2xx, r.errors), (6, 5, 11))

    def test_connect_errors_and_timeouts_apart(self):
        r = wrk.parse(WRK_OUTPUT.replace("connect 0, read 3, write 1, timeout 2", "connect 7, read 3, write 1, timeout 2"))
        self.assertEqual((r.connect_errors, r.timeouts, r.socket_errors), (7, 2, 13))

    def test_clean_report_has_no_errors(self):
        clean = "\n".join(l for l in WRK_OUTPUT.splitlines() if "errors" not in l and "Non-2xx" not in l)
        self.assertEqual(wrk.parse(clean).errors, 0)

    def test_without_latency_distribution_is_an_error(self):
        with self.assertRaises(ValueError):
            wrk.parse(WRK_OUTPUT.replace("     99%    1.37s\n", ""))


class CountsTests(unittest.TestCase):
    def test_counts_cmd_argv(self):
        self.assertEqual(
            counts.cmd_argv("/s --x {listen} {backends}", "127.0.0.1:9", ["a:1", "b:2"]),
            ["/s", "--x", "127.0.0.1:9", "a:1", "b:2"],
        )

    def test_bin_with_flags_of_its_own(self):
        self.assertEqual(counts.parse_bin("new=/b"), ("new", "/b", []))
        self.assertEqual(
            counts.parse_bin("epoll=/b --engine epoll"), ("epoll", "/b", ["--engine", "epoll"])
        )

    def test_machine_cpu_per_request_is_busy_ticks_over_requests(self):
        # 100 busy ticks at 100 ticks/s over 1000 requests: 1 ms each; idle ticks do not count.
        with mock.patch.object(counts.machine, "CLK_TCK", 100):
            self.assertAlmostEqual(counts.machine_us_per_request((1000, 5000), (1100, 5400), 1000), 1000.0)
            # No request completed: divided by 1, not by zero.
            self.assertAlmostEqual(counts.machine_us_per_request((0, 0), (1, 2), 0), 10000.0)

    def test_kworker_cpu_delta_counts_new_threads_whole(self):
        # pid 1 used 0.5 s more, pid 3 appeared with 0.25 s, pid 2 exited (lost).
        self.assertAlmostEqual(counts.cpu_delta({1: 1.0, 2: 4.0}, {1: 1.5, 3: 0.25}), 0.75)

    def test_tcp_out_segments_come_from_the_tcp_rows_of_snmp(self):
        snmp = (
            "Ip: Forwarding DefaultTTL\nIp: 1 64\n"
            "Tcp: RtoAlgorithm RtoMin ActiveOpens OutSegs RetransSegs\nTcp: 1 200 7 12345 3\n"
            "Udp: InDatagrams\nUdp: 9\n"
        )
        self.assertEqual(counts.machine.parse_tcp_out_segments(snmp), 12345)
        self.assertIsNone(counts.machine.parse_tcp_out_segments("Ip: a\nIp: 1\n"))
        self.assertIsNone(counts.machine.parse_tcp_out_segments("Tcp: OutSegs\nTcp: x\n"))


class LogTests(unittest.TestCase):
    def test_worker_ready(self):
        line = targets.parse_log_line(
            "2026-11-27T10:13:58.076635Z  INFO worker ready slot=0 pid=15772 addr=127.0.0.1:38369 in_rotation=1"
        )
        self.assertEqual(line.message, "worker ready")
        self.assertEqual(line.fields, {"slot": "0", "pid": "15772", "addr": "127.0.0.1:38369", "in_rotation": "1"})
        self.assertAlmostEqual(line.ts % 60, 58.076635, places=5)

    def test_quoted_field_and_warning(self):
        line = targets.parse_log_line(
            '2026-11-27T10:14:03.048307Z  WARN worker out of rotation slot=0 pid=1 reason="master stopping" in_rotation=1'
        )
        self.assertEqual((line.level, line.message, line.fields["reason"]), ("WARN", "worker out of rotation", "master stopping"))

    def test_relayed_worker_output_is_not_a_log_line(self):
        self.assertIsNone(targets.parse_log_line("[worker 0 pid 12 stderr] worker ready slot=9"))

    def test_ready_workers_follows_exits(self):
        proc = mock.Mock()
        proc.lines = [
            (0, "2026-11-27T10:00:00.000001Z  INFO worker ready slot=0 pid=10 addr=127.0.0.1:1000 in_rotation=1"),
            (0, "2026-11-27T10:00:00.000002Z  INFO worker ready slot=1 pid=11 addr=127.0.0.1:1001 in_rotation=2"),
            (0, "2026-11-27T10:00:00.000003Z  WARN worker exited slot=0 pid=10 status=signal 9 (SIGKILL)"),
        ]
        bal = targets.Balancer(proc, "127.0.0.1:9")
        self.assertEqual(bal.ready_workers(), {1: (11, "127.0.0.1:1001")})


class ModeTests(unittest.TestCase):
    def modes(self, help_text):
        with mock.patch("subprocess.run") as run:
            run.return_value.stdout = help_text
            return targets.balancer_modes("balancer")

    def test_no_mode_flag(self):
        self.assertEqual(self.modes("Options:\n  -c, --cpus <CPUS>\n          How many\n"), [])

    def test_short_possible_values(self):
        text = "  -m, --mode <MODE>  how [default: proxy] [possible values: proxy, shared, reuseport, handoff]\n  -h, --help\n"
        self.assertEqual(self.modes(text), ["proxy", "shared", "reuseport", "handoff"])

    def test_long_possible_values(self):
        text = (
            "      --mode <MODE>\n          How\n\n          Possible values:\n"
            "          - proxy:     the master proxies\n          - reuseport: SO_REUSEPORT\n\n"
            "  -v, --verbose...\n          Possible values:\n          - nope: not mode\n"
        )
        self.assertEqual(self.modes(text), ["proxy", "reuseport"])


class RatioTests(unittest.TestCase):
    def run_(self, rnd, target, rps, cpu):
        return report.Run(rnd, "ka50", target, 0.0, rps, 1.0, 2.0, 1000, 0, 0, cpu, 0.0, 1.0, 0.0, 0.0)

    def test_ratios_are_paired_per_round(self):
        runs = [
            self.run_(1, "nginx", 100.0, 0.010),
            self.run_(1, "balancer", 90.0, 0.020),
            self.run_(2, "nginx", 50.0, 0.010),
            self.run_(2, "balancer", 60.0, 0.010),
            self.run_(3, "nginx", 200.0, 0.010),
            self.run_(3, "balancer", 200.0, 0.030),
            self.run_(1, "direct", 300.0, None),
        ]
        rows = {r.target: r for r in report.summarize(runs, ["ka50"], ["direct", "balancer", "nginx"])}
        b = rows["balancer"]
        self.assertEqual(b.rps, 90.0)
        self.assertAlmostEqual(b.rps_ratio["nginx"], 1.0)  # median of 0.9, 1.2, 1.0
        self.assertAlmostEqual(b.cpu_us_per_req, 20.0)
        self.assertAlmostEqual(b.cpu_ratio["nginx"], 2.0)  # median of 2, 1, 3
        self.assertAlmostEqual(b.rps_ratio["direct"], 0.3)  # only round 1 has both
        self.assertIsNone(b.rps_ratio["haproxy"])
        self.assertIsNone(rows["direct"].cpu_us_per_req)


def point(rnd, conns, target, rps, cpu_s, reached, peak=1024):
    return cost_report.Point(rnd, conns, target, 0.0, rps, 1.0, 2.0, 1000, 1, 0, 0, cpu_s, 0.01, 0.0,
                             512, 800, peak, reached, reached, 1.0, 0, 3.5, 0.5)


class CostCurveTests(unittest.TestCase):
    def test_rows_pair_with_nginx_and_keep_the_worst(self):
        pts = [
            point(1, 10, "nginx", 100.0, 0.010, 10),
            point(1, 10, "balancer-proxy", 120.0, 0.005, 10, peak=4096),
            point(2, 10, "nginx", 50.0, 0.010, 10),
            point(2, 10, "balancer-proxy", 50.0, 0.020, 9),
            point(3, 10, "nginx", 80.0, 0.010, 10),
        ]
        rows = {r.target: r for r in cost_report.summarize(pts, ["balancer-proxy", "nginx", "haproxy"], [10])}
        self.assertNotIn("haproxy", rows)
        b = rows["balancer-proxy"]
        self.assertAlmostEqual(b.rps_x_nginx, 1.1)  # median of 1.2 and 1.0; round 3 unpaired
        self.assertAlmostEqual(b.cpu_x_nginx, 1.25)  # median of 0.5 and 2.0
        self.assertEqual((b.reached, b.connect_errors, b.rss_peak_mib), (9, 2, 4.0))
        self.assertIsNone(rows["nginx"].rps_x_nginx)
        self.assertAlmostEqual(b.cpu_us_per_req, 12.5)  # median of 5 and 20 µs


class GoalTests(unittest.TestCase):
    def run_(self, rnd, load, target, rps, cpu, p99=2.0):
        return report.Run(rnd, load, target, 0.0, rps, 1.0, p99, 1000, 0, 0, cpu, 0.0, 1.0, 0.0, 0.0)

    def test_met_and_not_met_from_the_runs(self):
        runs = []
        for load in ("ka50", "close50"):
            runs += [self.run_(1, load, "nginx", 100.0, 0.020, 2.0), self.run_(1, load, "haproxy", 100.0, 0.020),
                     self.run_(1, load, "balancer", 120.0, 0.010, 1.0), self.run_(1, load, "direct", 200.0, None),
                     self.run_(1, load, "balancer-shared", 196.0, 0.0), self.run_(1, load, "balancer-reuseport", 180.0, 0.0),
                     self.run_(1, load, "node-cluster", 100.0, 0.01), self.run_(1, load, "balancer-shared-node", 101.0, 0.0),
                     self.run_(1, load, "balancer-handoff-node", 99.0, 0.0)]
        rows = report.summarize(runs, ["ka50", "close50"], ["direct", "balancer", "nginx", "haproxy", "balancer-shared", "balancer-reuseport"])
        memory = SimpleNamespace(master_rss_idle_kib=4000, master_bytes_per_conn=2048.0, proxied=9000)
        respawns = [SimpleNamespace(ready_ms=5.0), SimpleNamespace(ready_ms=120.0), SimpleNamespace(ready_ms=130.0)]
        found = [g.met for g in goals.check(runs, rows, ["ka50", "close50"], memory, respawns)]
        # cpu 0.5x, rps 1.2x nginx, 1.2x haproxy, p99 0.5x: met; shared 0.98x met, reuseport 0.9x not;
        # shared-node 1.01x met, handoff-node 0.99x not; idle RSS, per connection met; replacement median 120 ms not.
        self.assertEqual(found, [True, True, True, True, True, False, True, False, True, True, False])

    def test_the_epoll_engine_gets_its_own_rows_when_measured(self):
        runs = []
        for load in ("ka50", "close50"):
            runs += [self.run_(1, load, "nginx", 100.0, 0.020, 2.0), self.run_(1, load, "balancer", 90.0, 0.030, 1.0),
                     self.run_(1, load, "balancer-epoll", 120.0, 0.010, 1.0)]
        rows = report.summarize(runs, ["ka50", "close50"], ["balancer", "nginx", "balancer-epoll"])
        found = {g.what: g.met for g in goals.check(runs, rows, ["ka50", "close50"], None, [])}
        self.assertTrue(found["`proxy --engine epoll` master CPU/request ≤ 0.8× nginx, every load"])
        self.assertTrue(found["`proxy --engine epoll` req/s ≥ 1.1× nginx, every load"])
        self.assertFalse(found["`proxy` req/s ≥ 1.1× nginx, every load"])
        self.assertEqual(sum("epoll" in w for w in found), 3)

    def test_missing_figures_are_no_figure(self):
        found = goals.check([], [], ["ka50"], None, [])
        self.assertTrue(all(g.met is None for g in found))
        self.assertIn("no figure", goals.markdown(found))


class ProfileTests(unittest.TestCase):
    def test_perf_report_lines_are_grouped_by_part(self):
        import kernel_profile as prof

        text = """# Samples: 1K of event 'cpu-clock'
    20.00%  [kernel.kallsyms]  [k] tcp_sendmsg_locked
    10.00%  [kernel.kallsyms]  [k] ipt_do_table
     5.00%  [kernel.kallsyms]  [k] _raw_spin_unlock_irqrestore
     5.00%  [kernel.kallsyms]  [k] finish_task_switch.isra.0
     4.00%  [kernel.kallsyms]  [k] ep_poll_callback
     3.00%  balancer           [.] proxy::engine::Engine::turn
     2.00%  libc.so.6          [.] __memmove_avx_unaligned_erms
     1.00%  [kernel.kallsyms]  [k] clear_page_erms
"""
        shares = prof.parse_report(text)
        self.assertEqual(shares["TCP/IP/socket/skb"], 20.0)
        self.assertEqual(shares["netfilter/conntrack"], 10.0)
        self.assertEqual(shares["locks/irq restore"], 5.0)
        self.assertEqual(shares["scheduler/switch"], 5.0)
        self.assertEqual(shares["epoll"], 4.0)
        self.assertEqual(shares["user space (the proxy's own code)"], 3.0)
        self.assertEqual(shares["libc"], 2.0)
        self.assertEqual(shares["slab/page alloc"], 1.0)


class ReadmeTests(unittest.TestCase):
    def test_splice_replaces_between_markers_and_appends_once(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "README.md"
            path.write_text("# title\n\nprose\n")
            readme.splice(path, "x", "one", "## X")
            readme.splice(path, "x", "two", "## X")
            text = path.read_text()
            self.assertEqual(text.count("## X"), 1)
            self.assertIn("<!-- x:begin -->\ntwo\n<!-- x:end -->", text)
            self.assertNotIn("one", text)


class SoakTests(unittest.TestCase):
    def attempt(self, start, conn, kind="short"):
        return soak.Attempt(start, start + 0.05, kind, True, conn)

    def test_a_cut_at_a_retired_backends_grace_is_a_casualty(self):
        faults = soak.Faults(retired_cuts=[10.02])
        self.assertTrue(soak.retired_cut(self.attempt(10.0, "reused"), faults))
        self.assertFalse(soak.retired_cut(self.attempt(12.0, "reused"), faults))

    def test_an_upgrade_excuses_reused_connections_only(self):
        faults = soak.Faults(upgrade_windows=[(20.0, 21.0)])
        self.assertTrue(soak.upgrade_cut(self.attempt(20.5, "reused"), faults))
        self.assertFalse(soak.upgrade_cut(self.attempt(20.5, "new"), faults))
        self.assertFalse(soak.upgrade_cut(self.attempt(30.0, "reused"), faults))

    def test_a_kill_window_makes_a_sent_request_a_casualty(self):
        faults = soak.Faults(kills=[(5.0, 5.01)])
        self.assertTrue(soak.casualty(self.attempt(5.2, "new", "reset"), faults))
        unsent = soak.Attempt(5.2, 5.25, "refused", False, "new")
        self.assertFalse(soak.casualty(unsent, faults))

    def test_a_new_connection_timeout_across_an_upgrade_is_a_failed_new_request(self):
        # A request that waited its whole timeout in the backlog while the master drained;
        # a worker was killed meanwhile, which used to file it as that kill's casualty.
        faults = soak.Faults(kills=[(12.0, 12.01)], upgrade_windows=[(10.5, 20.3)])
        waited = soak.Attempt(10.0, 15.0, "timeout", True, "new")
        self.assertIsNone(soak.casualty_cause(waited, faults))
        self.assertEqual(soak.failed_new_kind(waited, faults), "timeout in the listen backlog during an upgrade's drain")
        # The same timeout with no upgrade around it is still the kill's casualty.
        self.assertEqual(soak.casualty_cause(waited, soak.Faults(kills=faults.kills)), "kill or stop of their worker")
        # A reset on a new connection in the window is not a backlog wait.
        reset = soak.Attempt(12.0, 12.02, "reset", True, "new")
        self.assertEqual(soak.casualty_cause(reset, faults), "kill or stop of their worker")
        # A timeout on a reused connection across the upgrade is the upgrade's cut.
        reused = soak.Attempt(10.0, 15.0, "timeout", True, "reused")
        self.assertEqual(soak.casualty_cause(reused, soak.Faults(upgrade_windows=faults.upgrade_windows)), "reused connection cut by an in-place upgrade")
        # Outside every window: a plain failed new request.
        late = soak.Attempt(30.0, 35.0, "timeout", True, "new")
        self.assertIsNone(soak.casualty_cause(late, faults))
        self.assertEqual(soak.failed_new_kind(late, faults), "timeout on a new connection")

    def test_start_end_and_trend_of_a_series(self):
        samples = [(float(t), 1024 * 10, 40, 6, 4) for t in range(0, 180)]
        rows = {r[0]: r for r in soak.series_rows(samples)}
        self.assertEqual(rows["RSS (MiB)"][1], "10.0 → 10.0")
        self.assertEqual(rows["open fds"][5], "+0.000")


if __name__ == "__main__":
    unittest.main()


class AcceptAbStrace(unittest.TestCase):
    """`strace -c` rows with and without an errors column: accepted = calls - errors."""

    def test_calls_and_errors(self):
        text = """% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 13.05    0.039915           5      7659      1830 accept4
  8.48    0.025922           3      7050      1221 recvfrom
  6.05    0.018493           3      5829           setsockopt
------ ----------- ----------- --------- --------- ----------------
100.00    0.305785           5     52892      3055 total
"""
        rows = accept_ab.parse_strace(text)
        self.assertEqual(rows["accept4"], (7659, 1830))
        self.assertEqual(rows["setsockopt"], (5829, 0))
        self.assertNotIn("total", rows)
