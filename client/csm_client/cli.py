"""csm-say: speak a line with a CSM Triton server and write it to a WAV file.

  csm-say "Nice to meet you." --speaker 1 \\
      --context-text "Hello, how are you?" 0 --context earlier.wav "I'm fine, thanks." 1 -o reply.wav

Context segments are given in conversation order, both flags interleaved as on the command line.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import soundfile

from .client import CSMClient, CSMError
from .segment import Segment


class AppendSegment(argparse.Action):
    """Appends (kind, values) to one shared list, so --context and --context-text keep their
    command-line order. `const` is the kind: "audio" or "text"."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values, option_string=None) -> None:
        speaker = values[-1]
        if not speaker.isdigit():
            parser.error(f"{option_string}: SPEAKER must be an integer >= 0, got {speaker!r}")
        segments = list(getattr(namespace, self.dest) or [])
        segments.append((self.const, [*values[:-1], int(speaker)]))
        setattr(namespace, self.dest, segments)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csm-say", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", help="what to say")
    parser.add_argument("--speaker", type=int, default=0, help="speaker id (default 0)")
    parser.add_argument(
        "--context", dest="segments", nargs=3, metavar=("WAV", "TEXT", "SPEAKER"), action=AppendSegment, const="audio",
        help="an earlier turn with its audio (a mono WAV); repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--context-text", dest="segments", nargs=2, metavar=("TEXT", "SPEAKER"), action=AppendSegment, const="text",
        help="an earlier turn as text only; repeatable",
    )  # fmt: skip
    parser.add_argument("--temperature", type=float, help="sampling temperature (server default 0.9)")
    parser.add_argument("--topk", type=int, help="top-k sampling (server default 50)")
    parser.add_argument("--max-ms", type=int, help="longest audio to generate, in ms (server default 10000)")
    parser.add_argument("--seed", type=int, help="sampling seed, for repeatable output")
    parser.add_argument("--url", help="server address (default localhost:8001 for gRPC, localhost:8000 for HTTP)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--model-name", default="csm")
    parser.add_argument("-o", "--output", type=Path, required=True, help="WAV file to write")
    parser.add_argument("-v", "--verbose", action="store_true", help="log requests")
    return parser.parse_args(argv)


def read_segment(kind: str, values: list) -> Segment:
    if kind == "text":
        text, speaker = values
        return Segment(speaker=speaker, text=text)
    path, text, speaker = values
    try:
        audio, sample_rate = soundfile.read(path, dtype="float32", always_2d=True)  # [samples, channels]
    except (OSError, soundfile.LibsndfileError) as error:
        raise ValueError(f"--context {path}: cannot read it as audio ({error})") from error
    if audio.shape[1] != 1:
        raise ValueError(f"--context {path}: has {audio.shape[1]} channels; context audio must be mono (mix it down first)")
    return Segment(speaker=speaker, text=text, audio=audio[:, 0], sample_rate=sample_rate)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        context = [read_segment(kind, values) for kind, values in args.segments or []]
        with CSMClient(args.url, args.protocol, args.model_name) as client:
            audio, sample_rate = client.generate(
                args.text,
                args.speaker,
                context,
                temperature=args.temperature,
                topk=args.topk,
                max_audio_length_ms=args.max_ms,
                seed=args.seed,
            )
    except (CSMError, ValueError, RuntimeError) as error:
        print(f"csm-say: error: {error}", file=sys.stderr)
        sys.exit(1)
    soundfile.write(args.output, audio, sample_rate)
    print(f"wrote {args.output}: {len(audio) / sample_rate:.2f} s of audio at {sample_rate} Hz")


if __name__ == "__main__":
    main()
