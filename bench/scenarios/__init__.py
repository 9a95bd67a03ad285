"""The scenarios: each module has NAME, TITLE and run(env, ...) -> ScenarioResult."""
