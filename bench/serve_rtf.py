"""One stream at a time through a running speech gateway (`make serve`), as a person hears it:
time to first audio, real-time factor (wall time / audio length, Mimi included) and streaming
viability (each piece arrives before the audio received so far has finished playing), with the
machine's memory bandwidth read just before (what a CPU frame's time follows).

Requests are OpenAI speech requests for raw PCM (24 kHz, 16-bit mono), read as they stream in.
Usage: python bench/serve_rtf.py [--url http://localhost:8080] [--requests 5] [--audio-ms 4000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import urllib.request
from pathlib import Path

from engine_bench import read_bandwidth  # beside this script
from tqdm import tqdm

from csm_client.contract import SAMPLE_RATE

BYTES_PER_SECOND = SAMPLE_RATE * 2  # 16-bit mono PCM
LINES = (
    "Hello, thanks for calling. How can I help you today?",
    "I would like to move my appointment to Thursday afternoon, if that is possible.",
    "Of course. Would three o'clock work for you?",
    "That is perfect. Thank you so much for your help.",
    "You are welcome. Have a lovely day.",
)


def one_stream(url: str, text: str, audio_ms: int) -> dict:
    fields = {"model": "csm-1b", "input": text, "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": audio_ms}
    body = json.dumps(fields).encode()
    request = urllib.request.Request(f"{url}/v1/audio/speech", body, {"Content-Type": "application/json"})
    start = time.perf_counter()
    arrivals, received, viable = [], 0, True
    with urllib.request.urlopen(request, timeout=600) as response:
        while piece := response.read1(1 << 16):
            now = time.perf_counter() - start
            if arrivals and received / BYTES_PER_SECOND < now - arrivals[0]:
                viable = False  # the audio already received finished playing before this piece came
            arrivals.append(now)
            received += len(piece)
    wall = time.perf_counter() - start
    audio_s = received / BYTES_PER_SECOND
    return {"text": text, "ttfa_s": arrivals[0], "audio_s": audio_s, "wall_s": wall, "rtf": wall / audio_s, "viable": viable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8080", help="the gateway")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--audio-ms", type=int, default=4000, help="the most audio a request asks for (random weights never end sooner)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    bandwidth = read_bandwidth()  # this machine's memory bandwidth now: on a shared VM it varies by the hour
    one_stream(args.url, "Warm up.", 800)
    runs = [one_stream(args.url, LINES[i % len(LINES)], args.audio_ms) for i in tqdm(range(args.requests), desc="streams")]
    results = {
        "command": "python bench/" + Path(__file__).name,
        "machine": platform.processor() or platform.machine(),
        "read_bandwidth_gb_s_before": bandwidth / 1e9,
        "ttfa_s_median": statistics.median(run["ttfa_s"] for run in runs),
        "rtf_median": statistics.median(run["rtf"] for run in runs),
        "viable": sum(run["viable"] for run in runs) / len(runs),
        "runs": runs,
    }
    print(json.dumps({key: value for key, value in results.items() if key != "runs"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
