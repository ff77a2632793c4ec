"""Screenshots of the MLflow UI for README: a run directory's sqlite store served by `mlflow server` on 127.0.0.1,
photographed with headless Chromium (the Debian package) through Playwright.

Usage: python docs/mlflow_screenshots.py RUN_DIR [--out docs] [--chromium /usr/bin/chromium]
Writes mlflow_experiment.png (the experiment's runs in the model-training view), mlflow_training_charts.png (the per-σ
loss group), mlflow_sample_grid.png (the last grid) and mlflow_tuning_runs.png (when RUN_DIR holds a tuning job).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlflow.tracking import MlflowClient  # noqa: E402

from tests.servers import MlflowServer  # noqa: E402


def _served(run_dir: Path) -> MlflowServer:
    """`mlflow server` over RUN_DIR's own store (its runs' artifacts are absolute paths, served as they are)."""
    return MlflowServer(run_dir).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server = _served(args.run_dir.resolve())
    try:
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("ncsn").experiment_id
        runs = {r.info.run_name: r for r in client.search_runs([experiment])}
        training = next(r for r in runs.values() if "loss" in r.data.metrics and not r.info.run_name.endswith("-pipeline"))
        base = f"{server.uri}/#/experiments/{experiment}"
        pipeline = next((name for name in runs if name.endswith("-pipeline")), None)
        view = "workflowType=machine_learning"  # the UI's model-training view (it opens in its GenAI view otherwise)
        # name: (URL, the parent run whose children to show, the charts to search for)
        pages = {"mlflow_experiment.png": (f"{base}/runs?{view}", pipeline, None),  # the runs, the pipeline's expanded
                 "mlflow_training_charts.png": (f"{base}/runs/{training.info.run_id}/model-metrics?{view}", None, "loss_per_sigma")}
        images = sorted((a.path for a in client.list_artifacts(training.info.run_id, "images") if a.path.endswith(".png")),
                        key=lambda path: int(path.split("+step+")[1].split("+")[0]))
        if images:  # the last sample grid, as the artifact view shows it
            pages["mlflow_sample_grid.png"] = (f"{base}/runs/{training.info.run_id}/artifacts/{images[-1]}?{view}", None, None)
        tune = next((name for name in runs if name.endswith("-tune")), None)
        if tune:  # the tuning job's parent run with its trials, the columns of its objective
            pages["mlflow_tuning_runs.png"] = (f"{base}/runs?{view}", tune, None)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            for name, (url, parent, search) in pages.items():
                page.goto(url)
                page.wait_for_timeout(8000)  # the UI polls (auto-refresh): there is no network-idle moment to wait for
                for label in ("Close", "close"):  # the assistant side panel, when the UI opens it
                    for button in page.get_by_role("button", name=label).all():
                        if button.is_visible():
                            button.click()
                if parent:
                    box = page.get_by_text(parent, exact=True).first.bounding_box()
                    page.mouse.click(box["x"] - 30, box["y"] + box["height"] / 2)  # the expander left of a parent run
                    page.wait_for_timeout(2000)
                if search:  # the charts whose name matches, e.g. the logged images
                    page.get_by_placeholder("Search metric charts").first.fill(search)
                    page.wait_for_timeout(6000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(args.out / name))
                print(args.out / name)
            browser.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
