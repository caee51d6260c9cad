"""lab/records/lookup.py: an experiment is created once and found again (a deleted one
restored), and a parent run is created once and then found, the earliest of its tags."""

from mlflow.tracking import MlflowClient

from lab.records.lookup import experiment_id, find_or_create_run, find_run


def test_an_experiment_is_created_once_and_a_deleted_one_is_restored(store):
    client = MlflowClient(store)
    created = experiment_id(client, "grid-a", store)
    assert experiment_id(client, "grid-a", store) == created
    client.delete_experiment(created)
    assert experiment_id(client, "grid-a", store) == created
    assert client.get_experiment(created).lifecycle_stage == "active"


def test_a_parent_run_is_created_once_then_found(store):
    client = MlflowClient(store)
    experiment = experiment_id(client, "parents", store)
    match = {"gatelab.grid": "core", "gatelab.role": "parent"}
    run_id, created = find_or_create_run(client, experiment, match, "core",
                                         extra_tags={"gatelab.note": "first"})
    assert created
    assert find_or_create_run(client, experiment, match, "core") == (run_id, False)
    tags = client.get_run(run_id).data.tags
    assert tags["mlflow.runName"] == "core" and tags["gatelab.note"] == "first"
    assert {k: tags[k] for k in match} == match
    assert find_run(client, experiment, {**match, "gatelab.grid": "other"}) is None


def test_of_several_runs_with_the_tags_the_earliest_is_the_one(store):
    client = MlflowClient(store)
    experiment = experiment_id(client, "several", store)
    first = client.create_run(experiment, start_time=1000, tags={"role": "parent"}).info.run_id
    client.create_run(experiment, start_time=2000, tags={"role": "parent"})
    client.create_run(experiment, start_time=500, tags={"role": "cell"})
    assert find_run(client, experiment, {"role": "parent"}) == first
