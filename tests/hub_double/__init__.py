"""A TEST DOUBLE of the Hugging Face Hub service, for the test suite only (not product code).

The real Hub is unreachable from CI. ``HubDouble`` is a small HTTP server on 127.0.0.1 that
implements the subset of the Hub's HTTP API that ``huggingface_hub`` 2.4 calls for
``create_repo``, ``create_branch``, ``create_commit`` (preupload, LFS batch/upload/verify,
NDJSON commit), ``repo_info``/``model_info``, ``list_repo_tree``, ``hf_hub_download`` and
``snapshot_download``, with the Hub's auth rules and error shapes. Point the real client at
it with ``HF_ENDPOINT`` (see :meth:`HubDouble.client_env`)::

    with HubDouble(tmp_path / "hub") as hub:
        hub.add_token("hf_alice_write", user="alice", orgs=["smash"])
        env = hub.client_env(hf_home=tmp_path / "hf", token="hf_alice_write")
        subprocess.run([...], env=env)

Uploads go through the classic LFS protocol: the double does not implement Xet storage,
so clients must run with ``HF_HUB_DISABLE_XET=1`` (``client_env`` sets it).
"""

from .server import HubDouble

__all__ = ["HubDouble"]
