"""Resumable runs: segments cut at source keyframes, kept beside the output, joined without
re-encoding; a run killed with SIGKILL goes on from its last complete segment when run again."""

import fcntl
import json
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from clips import corrupt_clip, demux_all, make_clip, stream_tags
from vidscale import pipeline, segments
from vidscale.cli import main
from vidscale.config import UpscaleSettings
from vidscale.media import EncodedSegment, EncoderSettings, VideoFrame, VideoReader, join_segments
from vidscale.pipeline import FrameUpscaler, upscale_segment

LOSSLESS = ["-c:v", "ffv1", "--progress", "none"]
# x264 at a preset with B-frames: each segment's encoder starts afresh with its own reorder delay.
BFRAMES = ["-c:v", "libx264", "--preset", "medium", "--progress", "none"]


@pytest.fixture
def run(cache_dir, identity_x2, capsys):
    def run(*args: str) -> tuple[int, str]:
        status = main(["--cache-dir", str(cache_dir), *args, "-m", str(identity_x2)])
        return status, capsys.readouterr().err

    return run


def frames(path) -> list[VideoFrame]:
    # strict: a join that broke the stream shows up as corrupt data, not as concealed pictures.
    with VideoReader(path, strict=True) as reader:
        return [e for e in reader.events() if isinstance(e, VideoFrame)]


def assert_same_output(segmented, whole, lossless=True):
    """Same frames (timestamps; pixels where the encoder is lossless, so deterministic across
    segment starts), same packets of every other stream, same streams, tags, chapters and
    attachments."""
    assert demux_all(segmented) == demux_all(whole)
    assert stream_tags(segmented) == stream_tags(whole)
    with av.open(str(segmented)) as a, av.open(str(whole)) as b:
        assert [(s.name, s.mimetype, s.data) for s in a.streams.attachments] == [
            (s.name, s.mimetype, s.data) for s in b.streams.attachments]
        assert a.streams.video[0].sample_aspect_ratio == b.streams.video[0].sample_aspect_ratio
    with av.open(str(segmented)) as a, av.open(str(whole)) as b:
        # Durations too: the last frame's is how long it shows, and sets the file's duration.
        assert [p.duration for p in a.demux(video=0) if p.size] == [p.duration for p in b.demux(video=0) if p.size]
    for x, y in zip(frames(segmented), frames(whole), strict=True):
        assert x.pts == y.pts
        # A lossy encoder that starts afresh at a segment codes the same pictures a little differently.
        assert np.array_equal(x.rgb, y.rgb) if lossless else np.abs(x.rgb.astype(int) - y.rgb).mean() < 3


@pytest.mark.parametrize("suffix", [".mp4", ".mov"])
def test_a_segmented_run_of_a_variable_rate_joins_into_mp4_and_mov(tmp_path, run, suffix):
    # A gap before a segment brought its encoder's first decode times (set back by the B-frame
    # delay) to the last segment's: the muxer refused the join after all the work, on every run.
    pts = [40 * (i + i // 7) for i in range(60)]
    source = make_clip(tmp_path / "in.mkv", frames=60, gop=10, pts=pts, audio="aac")
    whole, segmented = tmp_path / f"whole{suffix}", tmp_path / f"segmented{suffix}"
    for output, resume in ((whole, []), (segmented, ["--resume", "--segment-seconds", "0.5"])):
        status, err = run("upscale", str(source), "-o", str(output), *BFRAMES, *resume)
        assert status == 0, err
    # Not packet durations: MP4 derives them from decode times, which differ here by design.
    assert demux_all(segmented)[1:] == demux_all(whole)[1:]
    assert demux_all(segmented)[0] == demux_all(whole)[0] == demux_all(source)[0]
    for x, y in zip(frames(segmented), frames(whole), strict=True):
        assert x.pts == y.pts and np.abs(x.rgb.astype(int) - y.rgb).mean() < 3


@pytest.mark.parametrize("suffix, codec", [(".mkv", LOSSLESS), (".mkv", BFRAMES), (".mp4", BFRAMES)])
def test_a_segmented_run_gives_what_one_run_gives(tmp_path, run, suffix, codec):
    mkv = suffix == ".mkv"
    # The last frame is held for a second: the joined stream must end where a single run's does.
    source = make_clip(tmp_path / "in.mkv", frames=30, gop=4, subtitles=mkv, attachment=mkv, chapters=True,
                       sar=Fraction(4, 3), durations=[40] * 29 + [1000])
    whole, segmented = tmp_path / f"whole{suffix}", tmp_path / f"segmented{suffix}"
    assert run("upscale", str(source), "-o", str(whole), *codec)[0] == 0
    status, err = run("upscale", str(source), "-o", str(segmented), *codec, "--resume", "--segment-seconds", "0.2")
    assert status == 0, err
    assert_same_output(segmented, whole, lossless=codec is LOSSLESS)
    in_pts = demux_all(source)[0]
    assert demux_all(segmented)[0] == in_pts and len(in_pts) == 30
    with av.open(str(segmented)) as out:
        assert out.duration / 10**6 == pytest.approx(2.16, abs=0.001)
    if codec is BFRAMES:
        with av.open(str(segmented)) as out:  # B-frames really were there to get wrong
            packets = [p for p in out.demux(video=0) if p.size]
            assert [p.pts for p in packets] != sorted(p.pts for p in packets)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.mkv", whole.name, segmented.name])


def test_segments_start_at_source_keyframes_and_never_reuse_across_a_start(tmp_path, run, monkeypatch):
    # A still picture: with exact reuse every frame but the first of each segment is reused.
    source = tmp_path / "still.mkv"
    picture = np.full((48, 64, 3), 90, np.uint8)
    with av.open(str(source), "w") as out:
        video = out.add_stream("libx264", rate=25, options={"preset": "ultrafast", "g": "7", "scenecut": "0"})
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for index in range(21):
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = index, Fraction(1, 25)
            out.mux(video.encode(frame))
        out.mux(video.encode())
    starts = []
    original = segments.SegmentSink.start

    def start(self, index, first_pts, decoded_before):
        starts.append(decoded_before)
        original(self, index, first_pts, decoded_before)

    monkeypatch.setattr(segments.SegmentSink, "start", start)
    status, err = run("upscale", str(source), "-o", str(tmp_path / "out.mkv"), *LOSSLESS, "--dedup", "exact",
                      "--resume", "--segment-seconds", "0.1")
    assert status == 0, err
    # Keyframes every 7 frames; 0.1 s is under 3 frames, so every keyframe starts a segment.
    assert starts == [0, 7, 14]
    assert "18 unchanged frames reused" in err
    assert len(frames(tmp_path / "out.mkv")) == 21


def test_resume_after_sigkill_keeps_complete_segments_and_gives_the_same_output(tmp_path, cache_dir, identity_x2,
                                                                                 run, monkeypatch):
    source = make_clip(tmp_path / "long.mkv", frames=300, size=(128, 96), codec="ffv1", subtitles=True,
                       chapters=True)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "long.x2.mkv"
    work = segments.work_dir_for(target)
    command = ["upscale", str(source), "-o", str(target), *LOSSLESS, "--resume", "--segment-seconds", "0.4"]
    process = subprocess.Popen([sys.executable, "-m", "vidscale", "--cache-dir", str(cache_dir), *command,
                                "-m", str(identity_x2)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(work.glob("segment-*.json"))) < 2 and process.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
    # Killed mid-way: nothing at the final path, no temporary file beside it, the work kept.
    assert [p.name for p in out.iterdir()] == [work.name]
    done = {json.loads(p.read_text())["index"]: json.loads(p.read_text())["frames"]
            for p in work.glob("segment-*.json")}
    assert 2 <= len(done) and sum(done.values()) < 300

    redone, sought = [], []
    original_complete, original_seek = segments.WorkDir.complete, VideoReader.seek

    def complete(self, record):
        redone.append(record.index)
        original_complete(self, record)

    def seek(self, pts):
        sought.append(pts)
        original_seek(self, pts)

    monkeypatch.setattr(segments.WorkDir, "complete", complete)
    monkeypatch.setattr(VideoReader, "seek", seek)
    status, err = run(*command)
    assert status == 0, err
    assert f"{sum(done.values())} frames resumed from an earlier run" in err, (done, err)
    assert redone and not set(redone) & set(done)  # complete segments were not done again
    assert min(redone) == len(done) and sorted(done) == list(range(len(done)))
    # Nor decoded again: the run started at the first segment left to do (frames are 40 ms apart).
    assert sought == [sum(done.values()) * 40]
    assert [p.name for p in out.iterdir()] == [target.name]  # the work directory is gone

    whole = tmp_path / "whole.mkv"
    assert run("upscale", str(source), "-o", str(whole), *LOSSLESS)[0] == 0
    assert_same_output(target, whole)


def test_fps_counts_only_the_frames_a_resumed_run_made():
    result = pipeline.VideoResult(output="out.mkv", frames=100, seconds=10.0, corrupt_packets=0, retimed_frames=0,
                                  reused_frames=0, resumed_frames=60)
    assert result.fps == 4.0


def test_a_changed_input_starts_its_segments_afresh(tmp_path, run):
    source = make_clip(tmp_path / "in.mkv", frames=12, codec="ffv1", audio=False)
    target = tmp_path / "out.mkv"
    work = segments.work_dir_for(target)
    work.mkdir()
    (work / "state.json").write_text(json.dumps({"input": "another file", "segment_seconds": 0.2}))
    (work / "segment-00000.mkv").write_bytes(b"from another input")
    (work / "segment-00000.json").write_text("{}")
    status, err = run("upscale", str(source), "-o", str(target), *LOSSLESS, "--resume", "--segment-seconds", "0.2")
    assert status == 0, err
    assert "resumed" not in err
    assert len(frames(target)) == 12 and not work.exists()


def test_resume_refuses_pipes(tmp_path, run):
    source = make_clip(tmp_path / "in.mkv", frames=2)
    status, err = run("upscale", str(source), "-o", "-", "--resume")
    assert status == 2
    assert "--resume needs a file input and a file output" in err


def test_batch_jobs_are_resumable_and_leave_no_work_behind(tmp_path, run):
    source = make_clip(tmp_path / "ep1.mkv", frames=20, gop=5, subtitles=True)
    out = tmp_path / "out"
    out.mkdir()
    status, err = run("batch", str(source), "--output-dir", str(out), *BFRAMES, "--segment-seconds", "0.2")
    assert status == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["ep1.upscaled.mkv", "ep1.upscaled.mkv.vidscale.json"]
    assert run("upscale", str(source), "-o", str(tmp_path / "whole.mkv"), *BFRAMES)[0] == 0
    assert_same_output(out / "ep1.upscaled.mkv", tmp_path / "whole.mkv", lossless=False)


@pytest.mark.parametrize("gop", ["closed", "open"])
def test_segments_upscaled_on_their_own_join_into_what_one_run_gives(tmp_path, run, cache_dir, identity_x2, gop):
    # B-frames in the source, so a segment decoded from its keyframe must drop or keep pictures
    # by timestamp; with an open GOP the pictures just before a keyframe in time come after it
    # in the file and belong to the segment before.
    options = {"x264-params": f"bframes=3:b-adapt=0:b-pyramid=normal:open-gop={int(gop == 'open')}:scenecut=0"}
    source = make_clip(tmp_path / "in.mkv", frames=40, gop=8, options=options, subtitles=True, chapters=True)
    with av.open(str(source)) as clip:
        packets = [p for p in clip.demux(video=0) if p.size]
        assert [p.pts for p in packets] != sorted(p.pts for p in packets)
    whole = tmp_path / "whole.mkv"
    assert run("upscale", str(source), "-o", str(whole), *LOSSLESS)[0] == 0

    frame_upscaler = FrameUpscaler(UpscaleSettings(model=str(identity_x2), cache_dir=cache_dir))
    encoder = EncoderSettings(codec="ffv1")
    with VideoReader(source) as reader:
        starts = segments.segment_starts(source, 0.3, reader.info.time_base)
    assert len(starts) == 5
    pieces = []
    for index in reversed(range(len(starts))):  # in any order, each on its own
        path = tmp_path / f"piece{index}.mkv"
        record = upscale_segment(source, path, starts, index, frame_upscaler, encoder).record
        assert record.first_pts == (starts[index] if index else 0)
        pieces.insert(0, (EncodedSegment(path, record.packets, record.extradata), record.frames))
    joined = tmp_path / "joined.mkv"
    with VideoReader(source) as reader:
        join_segments(joined, reader, encoder, [piece for piece, _ in pieces], sum(n for _, n in pieces))
    assert_same_output(joined, whole)


@pytest.mark.parametrize("broken, counts", [(2, [1, 0]), (4, [0, 1])])
def test_a_broken_packet_by_a_segment_edge_is_counted_by_its_own_segment(tmp_path, cache_dir, identity_x2,
                                                                        broken, counts):
    # Keyframes at pts 0 and 120; the packet just before or just after the second one broken.
    source = corrupt_clip(tmp_path, broken=broken, gop=3)
    with VideoReader(source) as reader:
        starts = segments.segment_starts(source, 0.12, reader.info.time_base)
    assert starts == [0, 120]
    frame_upscaler = FrameUpscaler(UpscaleSettings(model=str(identity_x2), cache_dir=cache_dir))
    assert [upscale_segment(source, tmp_path / f"piece{index}.mkv", starts, index, frame_upscaler,
                            EncoderSettings(codec="ffv1")).corrupt_packets for index in range(2)] == counts


def _stopped_before_the_join(run, command: list[str], monkeypatch) -> None:
    """Run `command`, stopped as Ctrl-C stops it once every segment is complete."""

    def stopped(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "join_segments", stopped)
        assert run(*command)[0] == 130


def test_a_run_stopped_after_its_last_segment_only_joins_when_run_again(tmp_path, run, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=20, gop=5, subtitles=True)
    target = tmp_path / "out.mkv"
    command = ["upscale", str(source), "-o", str(target), *LOSSLESS, "--resume", "--segment-seconds", "0.2"]
    _stopped_before_the_join(run, command, monkeypatch)
    assert len(list(segments.work_dir_for(target).glob("segment-*.json"))) == 4
    monkeypatch.setattr(VideoReader, "seek", lambda *_: pytest.fail("nothing is left to decode"))
    status, err = run(*command)
    assert status == 0, err
    assert "20 frames resumed from an earlier run" in err
    whole = tmp_path / "whole.mkv"
    assert run("upscale", str(source), "-o", str(whole), *LOSSLESS)[0] == 0
    assert_same_output(target, whole)


def test_a_whole_run_removes_the_work_a_stopped_resumable_run_left(tmp_path, run, monkeypatch):
    source = make_clip(tmp_path / "in.mkv", frames=20, gop=5)
    target = tmp_path / "out.mkv"
    work = segments.work_dir_for(target)
    _stopped_before_the_join(run, ["upscale", str(source), "-o", str(target), *LOSSLESS, "--resume",
                                   "--segment-seconds", "0.2"], monkeypatch)
    assert len(list(work.glob("segment-*.mkv"))) == 4
    # One held by a live run stays.
    with segments.WorkDir(target, segments.Resume({"input": "held"})):
        assert run("upscale", str(source), "-o", str(target), *LOSSLESS)[0] == 0
        assert work.is_dir()
    status, err = run("upscale", str(source), "-o", str(target), *LOSSLESS, "--overwrite")
    assert status == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mkv", "out.mkv"]


def test_the_work_directory_goes_while_its_lock_is_held(tmp_path, run, monkeypatch):
    # Released first, another run could take the directory and have it vanish under it.
    source = make_clip(tmp_path / "in.mkv", frames=20, gop=5)
    held = []
    remove = segments.WorkDir.remove

    def checked(work):
        with open(work.path / "lock") as other:
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        remove(work)

    monkeypatch.setattr(segments.WorkDir, "remove", checked)
    status, err = run("upscale", str(source), "-o", str(tmp_path / "out.mkv"), *LOSSLESS, "--resume",
                      "--segment-seconds", "0.2")
    assert status == 0, err
    assert held == [True]


@pytest.mark.parametrize("damage", ["cut short", "unreadable"])
def test_a_damaged_complete_segment_is_done_again(tmp_path, run, monkeypatch, damage):
    source = make_clip(tmp_path / "in.mkv", frames=20, gop=5, subtitles=True)
    target = tmp_path / "out.mkv"
    command = ["upscale", str(source), "-o", str(target), *LOSSLESS, "--resume", "--segment-seconds", "0.2"]
    _stopped_before_the_join(run, command, monkeypatch)
    segment = segments.work_dir_for(target) / "segment-00002.mkv"
    data = segment.read_bytes()
    segment.write_bytes(data[:len(data) * 2 // 3] if damage == "cut short" else bytes(len(data)))
    status, err = run(*command)
    assert status == 0, err
    assert "15 frames resumed from an earlier run" in err
    whole = tmp_path / "whole.mkv"
    assert run("upscale", str(source), "-o", str(whole), *LOSSLESS)[0] == 0
    assert_same_output(target, whole)
