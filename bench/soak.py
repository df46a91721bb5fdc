"""Soak test: the server at full slots for --minutes with every kind of request, counting the requests
that end wrong and watching csm_stream's processes for leaks.

Starts its own tritonserver on the tiny model (CPU, --slots slots), as bench/load_bench.py does, and
--users virtual users (default: twice the slots, so that a freed slot is taken at once) that send
requests back to back. The mix: unary `csm` over gRPC and HTTP, streaming `csm_stream`, invalid
requests (one input out of range: INVALID_ARG naming it is expected), streams the client cancels
after their first audio, and streams whose client drops its gRPC channel after their first audio;
load_bench's texts and contexts (none, text-only turns, an audio turn). And the speech gateway, run
as its own process beside the server (bench/gateway_mix.py): speech in every format and speed,
custom voices created, used and deleted, hostile bodies (a 4xx with OpenAI's error body is
expected), and clients that leave after their first audio bytes.

Every request must end once: a unary call's result or exception is its final response; a stream's
is the response flagged `triton_final_response` (empty finals asked for) or its error. Lost: no
final within --lost-after-s. Duplicated: a response after the final one. Every few seconds it
samples the RSS and threads of every process of the stack (tritonserver, each model's stub,
csm_stream's engine process, the gateway), the csm_* gauges, and how long
the health endpoints that the Kubernetes probes ask take to answer. At the end: the memory slope of
each process after the warm-up (least squares), what the server still counts once the load has
stopped, and the processes' threads before and after.

Usage: python bench/soak.py [--minutes 30] [--slots 8] [--users N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import queue
import random
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gateway_mix
import grpc
import httpx
import numpy as np
import psutil
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from load_bench import LoadSettings, infer_inputs, make_request, server_gauges, server_log_problems, start_server
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, serialize_byte_tensor

from csm_client.client import STREAM_HEADERS
from csm_triton.tools.server import free_ports

if TYPE_CHECKING:
    from csm_triton.tools.server import TritonServer

logger = logging.getLogger("soak")

UNARY_MODEL, STREAM_MODEL = "csm", "csm_stream"
# kind: (share of the requests, how it ends when all is well)
KINDS = {
    "unary_grpc": (0.15, "completed"),
    "unary_http": (0.10, "completed"),
    "stream": (0.25, "completed"),
    "invalid": (0.08, "invalid"),
    "cancel": (0.07, "cancelled"),
    "drop": (0.07, "dropped"),
    "gateway_speech": (0.12, "completed"),
    "gateway_voice": (0.04, "completed"),
    "gateway_hostile": (0.07, "invalid"),
    "gateway_disconnect": (0.05, "dropped"),
}
FAILED_AS_EXPECTED = ("invalid", "cancelled", "dropped")
# One input out of range per invalid request; the error must name it.
INVALID_INPUTS = {
    "TOPK": np.array([[0]], dtype=np.int32),
    "TEMPERATURE": np.array([[0.0]], dtype=np.float32),
    "SPEAKER": np.array([[-1]], dtype=np.int32),
    "MAX_AUDIO_LENGTH_MS": np.array([[40]], dtype=np.int32),
}
INVALID_STATUS = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400", "stream": "StatusCode.INVALID_ARGUMENT"}
MAX_AUDIO_MS = (800, 1600, 2400, 3200)  # short requests, so that many start and end
PROBES = ("/v2/health/ready", f"/v2/models/{STREAM_MODEL}/ready")  # what the Kubernetes probes ask
LEFTOVER_GAUGES = ("csm_streams", "csm_active_slots", "csm_waiting_requests")
PROBE_TIMEOUT_S = 5.0  # the probes' timeoutSeconds in docker/k8s
SETTLE_TIMEOUT_S = 30.0  # for the server to go idle once the load has stopped
MB = 1e6
LOG_LINE_PREFIX = re.compile(r"^[EWI]\d{4} [\d:.]+ +\d+ ")  # tritonserver's severity, date, time and thread


@dataclass
class Ending:
    """How a request ended, as its client saw it."""

    error: Exception | None = None  # what ended it
    lost: bool = False  # no final response within the bound
    after_final: int = 0  # responses that came after the final one
    stopped: bool = False  # the client cancelled it, or dropped its channel, after its first audio


@dataclass
class Record:
    """One request: its kind, transport and context, and how it ended."""

    kind: str
    transport: str
    context: str
    outcome: str  # completed, invalid, cancelled, dropped, unexpected, lost or duplicated
    seconds: float
    error: str | None = None


class Tally:
    """Requests sent and how they ended, from every user thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.records: list[Record] = []

    def send(self) -> None:
        with self._lock:
            self.sent += 1

    def add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def counts(self) -> Counter:
        with self._lock:
            return Counter(record.outcome for record in self.records)


def has_audio(result: Any) -> bool:
    audio = result.as_numpy("AUDIO")
    return audio is not None and audio.size > 0


def is_final(result: Any) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def unary(client: Any, module: Any, arrays: dict[str, np.ndarray], bound_s: float, **timeout: float) -> Ending:
    start = time.monotonic()
    try:
        client.infer(UNARY_MODEL, infer_inputs(module, arrays), outputs=[module.InferRequestedOutput("AUDIO")], **timeout)
    except Exception as error:  # the call's exception is its final response, whatever it is
        return Ending(error=error, lost=time.monotonic() - start >= bound_s)
    return Ending()


def stream(client: grpcclient.InferenceServerClient, arrays: dict[str, np.ndarray], bound_s: float, stop_at_audio: bool) -> Ending:
    """One request on the client's gRPC stream, read until its final response (or, with
    `stop_at_audio`, cancelled at its first audio); then the stream is closed, which returns once
    the server has ended the call, and anything that came meanwhile is counted."""
    events: queue.Queue = queue.Queue()
    client.start_stream(lambda result, error: events.put((result, error)), stream_timeout=bound_s, headers=STREAM_HEADERS)
    start, ending = time.monotonic(), Ending()
    try:
        outputs = [grpcclient.InferRequestedOutput("AUDIO")]
        try:
            client.async_stream_infer(STREAM_MODEL, infer_inputs(grpcclient, arrays), outputs=outputs, enable_empty_final_response=True)
        except InferenceServerException as error:  # the stream broke at once (the server is gone): this request's end
            ending.error = error
            return ending
        while True:
            try:
                result, error = events.get(timeout=max(0.0, start + bound_s - time.monotonic()))
            except queue.Empty:
                ending.lost = True
                break
            if error is not None:
                ending.error, ending.lost = error, time.monotonic() - start >= bound_s
                break
            if is_final(result):
                break
            if stop_at_audio and has_audio(result):
                ending.stopped = True
                break
    finally:
        client.stop_stream(cancel_requests=ending.lost or ending.stopped)
    if not (ending.lost or ending.stopped):
        ending.after_final = events.qsize()
    return ending


def stream_infer_request(arrays: dict[str, np.ndarray]) -> service_pb2.ModelInferRequest:
    """The gRPC message of a csm_stream request asking for AUDIO, for a call on a channel of our own."""
    request = service_pb2.ModelInferRequest(model_name=STREAM_MODEL)
    request.outputs.add(name="AUDIO")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(array.dtype), shape=array.shape)
        request.raw_input_contents.append(serialize_byte_tensor(array).item() if array.dtype == np.object_ else array.tobytes())
    return request


def dropped_stream(url: str, arrays: dict[str, np.ndarray], bound_s: float) -> Ending:
    """A stream on a gRPC channel of its own, which the client closes at the first audio with the
    call still open: as a client process that goes away."""
    channel = grpc.insecure_channel(url)
    ending = Ending()
    try:
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([stream_infer_request(arrays)]), timeout=bound_s)
        for response in call:
            if response.error_message:
                ending.error = InferenceServerException(response.error_message)
                break
            result = grpcclient.InferResult(response.infer_response)
            if is_final(result):
                break
            if has_audio(result):
                ending.stopped = True
                break
    except grpc.RpcError as error:
        ending.error, ending.lost = error, error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        channel.close()
    return ending


def names_field(error: Exception | None, field_name: str, transport: str) -> bool:
    """Whether the error is the INVALID_ARG (HTTP 400) whose message starts with the input's name."""
    if not isinstance(error, InferenceServerException):
        return False
    return error.status() == INVALID_STATUS[transport] and (error.message() or "").startswith(f"{field_name}:")


def outcome_of(kind: str, ending: Ending, transport: str, invalid_field: str | None) -> str:
    if ending.lost:
        return "lost"
    if ending.after_final:
        return "duplicated"
    if kind == "invalid":
        return "invalid" if names_field(ending.error, invalid_field, transport) else "unexpected"
    if ending.error is not None:
        return "unexpected"
    return KINDS[kind][1] if ending.stopped else "completed"  # a stream may end before its first audio


def describe(error: Exception | None) -> str | None:
    if error is None:
        return None
    if isinstance(error, InferenceServerException):
        return f"{error.status()}: {error.message()}"
    return f"{type(error).__name__}: {error}"


@dataclass
class UserSettings:
    """What every virtual user shares."""

    server: TritonServer
    gateway_url: str
    voices_key: str
    mix: LoadSettings  # load_bench's request mix (its seed), with the server's chunk sizes
    deadline: float
    lost_after_s: float
    tally: Tally


def virtual_user(index: int, settings: UserSettings) -> None:
    """Requests drawn from the mix, back to back until the deadline, over this user's own clients
    (tritonclient's are not thread-safe)."""
    rng = random.Random(f"{settings.mix.seed}-soak-user-{index}")
    kinds, shares = list(KINDS), [share for share, _ in KINDS.values()]
    server, bound_s = settings.server, settings.lost_after_s
    grpc_client = grpcclient.InferenceServerClient(server.grpc_url)
    http_client = httpclient.InferenceServerClient(server.http_url, connection_timeout=bound_s, network_timeout=bound_s)
    gateway = gateway_mix.GatewayUser(httpx.Client(base_url=settings.gateway_url), settings.voices_key, bound_s, rng)
    try:
        while time.monotonic() < settings.deadline:
            kind = rng.choices(kinds, shares)[0]
            if kind in gateway_mix.KINDS:
                settings.tally.send()
                start = time.monotonic()
                outcome, error = gateway_mix.KINDS[kind](gateway)
                settings.tally.add(Record(kind, "gateway", "none", outcome, time.monotonic() - start, error))
                continue
            spec = make_request(rng, settings.mix, rng.choice(MAX_AUDIO_MS))
            arrays, invalid_field = spec.arrays, None
            transport = {"unary_grpc": "grpc", "unary_http": "http"}.get(kind, "stream")
            if kind == "invalid":
                invalid_field, transport = rng.choice(list(INVALID_INPUTS)), rng.choice(list(INVALID_STATUS))
                arrays = {**arrays, invalid_field: INVALID_INPUTS[invalid_field]}
            settings.tally.send()
            start = time.monotonic()
            if kind == "drop":
                ending = dropped_stream(server.grpc_url, arrays, bound_s)
            elif transport == "http":
                ending = unary(http_client, httpclient, arrays, bound_s)
            elif transport == "grpc":
                ending = unary(grpc_client, grpcclient, arrays, bound_s, client_timeout=bound_s)
            else:
                ending = stream(grpc_client, arrays, bound_s, stop_at_audio=kind == "cancel")
            outcome = outcome_of(kind, ending, transport, invalid_field)
            error = describe(ending.error) if outcome in ("unexpected", "lost") else None
            settings.tally.add(Record(kind, transport, spec.context, outcome, time.monotonic() - start, error))
    finally:
        grpc_client.close()
        http_client.close()
        gateway.client.close()


def stack_processes(server: TritonServer, gateway: psutil.Process) -> list[psutil.Process]:
    """tritonserver, its python-backend stubs and csm_stream's engine process (not the stubs'
    orphan watches, shells that come and go), and the gateway."""
    found = [psutil.Process(server.process.pid), gateway]
    for child in psutil.Process(server.process.pid).children(recursive=True):
        try:
            if "csm-orphan-watch" not in " ".join(child.cmdline()) and child.name() not in ("sh", "sleep", "sed"):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


class Watch:
    """What the main thread measures while the users send: each process's RSS and threads and the
    server's gauges every --sample-s, and the probed endpoints' answer times."""

    def __init__(self, server: TritonServer, gateway: psutil.Process) -> None:
        self.server = server
        self.gateway = gateway
        self.metrics_url = f"localhost:{server.options.metrics_port}"
        self.start = time.monotonic()
        self.processes: dict[int, psutil.Process] = {}
        self.commands: dict[int, str] = {}
        self.memory: list[dict[str, Any]] = []  # t (s from start), pid, rss_mb, threads
        self.gauges: list[dict[str, Any]] = []  # t, then csm_* gauges
        self.probe_seconds: dict[str, list[float]] = {path: [] for path in PROBES}
        self.probe_failures: Counter = Counter()

    def sample_processes(self) -> list[dict[str, Any]]:
        """One sample of every process seen so far (those still running)."""
        for process in stack_processes(self.server, self.gateway):
            if process.pid not in self.processes:
                self.processes[process.pid], self.commands[process.pid] = process, " ".join(process.cmdline())
        taken = []
        for process in self.processes.values():
            try:
                with process.oneshot():
                    rss_mb, threads = process.memory_info().rss / MB, process.num_threads()
            except psutil.NoSuchProcess:
                continue
            taken.append({"t": time.monotonic() - self.start, "pid": process.pid, "rss_mb": rss_mb, "threads": threads})
        self.memory.extend(taken)
        return taken

    def sample_gauges(self) -> None:
        self.gauges.append({"t": time.monotonic() - self.start, **server_gauges(self.metrics_url)})

    def probe(self) -> None:
        """Each probed endpoint once: the seconds it takes to answer 200, or a failure (another
        answer, or none within the probes' timeout)."""
        for path in PROBES:
            sent = time.perf_counter()
            try:
                with urllib.request.urlopen(f"http://{self.server.http_url}{path}", timeout=PROBE_TIMEOUT_S):
                    self.probe_seconds[path].append(time.perf_counter() - sent)
            except OSError:  # HTTPError for an answer other than 2xx
                self.probe_failures[path] += 1

    def settle(self) -> tuple[dict[str, float | None], float]:
        """The gauges once the server has gone idle (or SETTLE_TIMEOUT_S has passed), and the seconds that took."""
        start = time.monotonic()
        while True:
            gauges = server_gauges(self.metrics_url)
            if all(gauges.get(name) == 0 for name in LEFTOVER_GAUGES) or time.monotonic() - start > SETTLE_TIMEOUT_S:
                return {name: gauges.get(name) for name in LEFTOVER_GAUGES}, time.monotonic() - start


def log_problem_counts(log_file: Path) -> list[tuple[str, int]]:
    """load_bench's problem lines of the server log, counted by message (a long run repeats them)."""
    messages = [LOG_LINE_PREFIX.sub("", line) for line in server_log_problems(log_file, limit=sys.maxsize)]
    return Counter(messages).most_common()


def gateway_log_problems(log_file: Path) -> list[tuple[str, int]]:
    """The gateway log's tracebacks and error lines, counted by line."""
    lines = [line.strip() for line in log_file.read_text(errors="replace").splitlines()]
    return Counter(line for line in lines if line.startswith("Traceback") or " ERROR " in line or "failed" in line).most_common()


def memory_figures(watch: Watch, warmup_s: float, threads_before: dict[int, int], threads_after: dict[int, int]) -> list[dict[str, Any]]:
    """Per process: RSS at its first and last sample, the least-squares slope (MB a minute) of the
    samples taken after the warm-up, and its threads before and after the load."""
    figures = []
    for pid, command in watch.commands.items():
        own = [sample for sample in watch.memory if sample["pid"] == pid]
        settled = [sample for sample in own if sample["t"] >= warmup_s]
        slope = None
        if len(settled) >= 3:
            minutes = np.array([sample["t"] for sample in settled]) / 60
            slope = float(np.polyfit(minutes, [sample["rss_mb"] for sample in settled], 1)[0])
        figures.append(
            {
                "pid": pid,
                "program": Path(command.split()[0]).name,
                "command": command,
                "rss_start_mb": own[0]["rss_mb"],
                "rss_end_mb": own[-1]["rss_mb"],
                "slope_mb_per_minute": slope,
                "samples_after_warmup": len(settled),
                "threads_before": threads_before.get(pid),
                "threads_after": threads_after.get(pid),
            }
        )
    return figures


def request_figures(tally: Tally) -> dict[str, Any]:
    counts = tally.counts()
    return {
        "sent": tally.sent,
        "completed": counts["completed"],
        "failed_as_expected": {outcome: counts[outcome] for outcome in FAILED_AS_EXPECTED},
        "failed_unexpectedly": counts["unexpected"],
        "lost": counts["lost"],
        "duplicated": counts["duplicated"],
        "by_kind": {kind: dict(Counter(record.outcome for record in tally.records if record.kind == kind)) for kind in KINDS},
        "by_context": dict(Counter(record.context for record in tally.records)),
        "unexpected_errors": Counter(record.error for record in tally.records if record.error is not None).most_common(10),
    }


def run(server: TritonServer, gateway: subprocess.Popen, gateway_url: str, voices_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """The users at work for --minutes while the main thread samples, then what is left once they stop."""
    watch = Watch(server, psutil.Process(gateway.pid))
    threads_before = {sample["pid"]: sample["threads"] for sample in watch.sample_processes()}
    duration_s = args.minutes * 60
    warmup_s = (args.warmup_minutes if args.warmup_minutes is not None else args.minutes / 5) * 60
    tally = Tally()
    mix = LoadSettings(duration_s=None, requests_per_user=None, stagger_s=0.0, seed=args.seed, first_chunk_frames=None, chunk_frames=None)
    settings = UserSettings(server, gateway_url, voices_key, mix, watch.start + duration_s, args.lost_after_s, tally)
    users = [threading.Thread(target=virtual_user, args=(index, settings), name=f"user-{index}") for index in range(args.users)]
    for user in users:
        user.start()
    next_sample_s = args.sample_s  # the first sample was taken just above
    with tqdm(total=round(duration_s), desc="soak", unit="s") as bar:
        while (elapsed := time.monotonic() - watch.start) < duration_s:
            watch.probe()
            if elapsed >= next_sample_s:
                next_sample_s += args.sample_s
                watch.sample_processes()
                watch.sample_gauges()
            counts = tally.counts()
            bar.set_postfix(sent=tally.sent, completed=counts["completed"], unexpected=counts["unexpected"], lost=counts["lost"])
            bar.update(min(round(elapsed), bar.total) - bar.n)
            time.sleep(1.0)
    logger.info("load stopped; waiting for the requests in flight")
    for user in users:
        user.join()
    left_over, settle_s = watch.settle()
    threads_after = {sample["pid"]: sample["threads"] for sample in watch.sample_processes()}
    active = [sample["csm_active_slots"] for sample in watch.gauges if sample["t"] >= warmup_s and "csm_active_slots" in sample]
    probes = {
        path: {
            "answers": len(seconds),
            "failures": watch.probe_failures[path],
            "max_s": max(seconds, default=None),
            "p99_s": float(np.percentile(seconds, 99)) if seconds else None,
        }
        for path, seconds in watch.probe_seconds.items()
    }
    return {
        "requests": request_figures(tally),
        "active_slots_after_warmup": {"mean": float(np.mean(active)) if active else None, "min": min(active, default=None)},
        "memory": memory_figures(watch, warmup_s, threads_before, threads_after),
        "left_over": {**left_over, "settle_s": settle_s},
        "probes": probes,
        "server_log_problems": log_problem_counts(args.server_log),
        "gateway_log_problems": gateway_log_problems(args.gateway_log),
        "memory_samples": watch.memory,
        "gauge_samples": watch.gauges,
        "records": [asdict(record) for record in tally.records],
    }


def print_report(results: dict[str, Any], slots: int) -> None:
    requests = results["requests"]
    expected = requests["failed_as_expected"]
    print(
        f"requests: sent {requests['sent']}, completed {requests['completed']}, failed as expected {sum(expected.values())} "
        f"({', '.join(f'{outcome} {count}' for outcome, count in expected.items())}), failed unexpectedly "
        f"{requests['failed_unexpectedly']}, lost {requests['lost']}, duplicated {requests['duplicated']}"
    )
    for kind, outcomes in requests["by_kind"].items():
        print(f"  {kind}: {', '.join(f'{outcome} {count}' for outcome, count in sorted(outcomes.items())) or 'none'}")
    for message, count in requests["unexpected_errors"]:
        print(f"  {count} x {message}")
    active = results["active_slots_after_warmup"]
    if active["mean"] is not None:
        print(f"active slots after the warm-up: mean {active['mean']:.2f}, min {active['min']:.0f} of {slots}")
    for figure in results["memory"]:
        slope = figure["slope_mb_per_minute"]
        print(
            f"process {figure['pid']} ({figure['program']}): RSS {figure['rss_start_mb']:.0f} -> {figure['rss_end_mb']:.0f} MB, "
            f"slope {'-' if slope is None else f'{slope:+.2f}'} MB/min after the warm-up ({figure['samples_after_warmup']} samples), "
            f"threads {figure['threads_before']} -> {figure['threads_after']}"
        )
    left = results["left_over"]
    print(f"left over: {', '.join(f'{name} {left[name]}' for name in LEFTOVER_GAUGES)} (after {left['settle_s']:.1f} s)")
    probes = results["probes"]
    for path in PROBES:
        slowest = probes[path]["max_s"]
        shown = "-" if slowest is None else f"{slowest * 1000:.0f} ms"
        print(f"probe {path}: {probes[path]['answers']} answers, slowest {shown}, failures {probes[path]['failures']}")
    for message, count in results["server_log_problems"]:
        logger.warning("server log: %d x %s", count, message)
    for message, count in results["gateway_log_problems"]:
        logger.warning("gateway log: %d x %s", count, message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the load runs")
    parser.add_argument("--slots", type=int, default=8, help="engine slots of the server this script starts")
    parser.add_argument("--users", type=int, help="virtual users sending back to back (default: twice the slots)")
    parser.add_argument("--warmup-minutes", type=float, help="samples before this are left out of the slopes (default: a fifth of the run)")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory and gauge samples")
    parser.add_argument("--lost-after-s", type=float, default=120.0, help="a request without its final response by then is lost")
    parser.add_argument("--seed", type=int, default=0, help="seeds the request mix")
    parser.add_argument("--server-log", type=Path, default=Path(tempfile.gettempdir()) / "csm-soak-server.log")
    parser.add_argument("--gateway-log", type=Path, default=Path(tempfile.gettempdir()) / "csm-soak-gateway.log")
    parser.add_argument("--json", type=Path, help="write every figure, sample and request here")
    args = parser.parse_args()
    args.users = args.users or 2 * args.slots
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line for every gateway request otherwise
    with tempfile.TemporaryDirectory() as tmp, logging_redirect_tqdm():
        server = start_server(Path(tmp), args.server_log, args.slots)
        voices_key, (gateway_port,) = secrets.token_urlsafe(24), free_ports(1)
        try:
            gateway = gateway_mix.start_gateway(server.grpc_url, gateway_port, voices_key, args.gateway_log)
            try:
                results = run(server, gateway, f"http://127.0.0.1:{gateway_port}", voices_key, args)
            finally:
                gateway.terminate()
                gateway.wait(timeout=60)
        finally:
            server.stop()
    print_report(results, args.slots)
    if args.json:
        settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
        machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": psutil.cpu_count()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"command": " ".join(["python", *sys.argv]), "settings": settings, "machine": machine, **results}, indent=2)
        )
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
