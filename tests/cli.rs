//! The `zae-limiter` command-line tool, run as a built binary against DynamoDB Local: every
//! command, its exit codes, JSON output parsed back, and a manifest round trip.

mod dynamo;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;
use zae_limiter::{DynamoDbRepository, RateLimiter};

/// The shared DynamoDB Local's endpoint (started on first use).
fn endpoint() -> String {
    runtime().block_on(dynamo::endpoint())
}

/// A table no other test uses.
fn unique_table(prefix: &str) -> String {
    dynamo::unique_namespace(&format!("cli-{prefix}"))
}

/// The binary with a clean environment, pointed at `endpoint` and `table`.
fn zl(endpoint: &str, table: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zae-limiter"));
    cmd.env_remove("AWS_ENDPOINT_URL")
        .env_remove("ZAEL_TABLE")
        .env_remove("ZAEL_NAMESPACE")
        .env_remove("RUST_LOG")
        .args(["--endpoint-url", endpoint, "--table", table])
        .timeout(Duration::from_secs(120));
    cmd
}

fn run(cmd: &mut Command, args: &[&str]) -> Output {
    cmd.args(args).output().expect("run zae-limiter")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs and expects exit code `code`; returns the output.
#[track_caller]
fn expect(cmd: &mut Command, args: &[&str], code: i32) -> Output {
    let out = run(cmd, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "zae-limiter {args:?}\nstdout: {}\nstderr: {}",
        stdout(&out),
        stderr(&out)
    );
    out
}

/// Runs, expects exit code `code` and `needle` in stderr; returns the output.
#[track_caller]
fn fails(cmd: &mut Command, args: &[&str], code: i32, needle: &str) -> Output {
    let out = expect(cmd, args, code);
    assert!(
        stderr(&out).contains(needle),
        "zae-limiter {args:?}: stderr lacks {needle:?}: {}",
        stderr(&out)
    );
    out
}

/// Runs with `--output json`, expects success, and parses stdout.
#[track_caller]
fn json(cmd: &mut Command, args: &[&str]) -> Value {
    let mut all = vec!["--output", "json"];
    all.extend_from_slice(args);
    let out = expect(cmd, &all, 0);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {}", stdout(&out)))
}

/// A deployed table of its own, with the `default` namespace.
fn deployed(prefix: &str) -> (String, String) {
    let (url, table) = (endpoint(), unique_table(prefix));
    let deploy = json(&mut zl(&url, &table), &["deploy"]);
    assert_eq!(deploy["created"], true);
    (url, table)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn limiter(rt: &tokio::runtime::Runtime, url: &str, table: &str, namespace: &str) -> RateLimiter {
    let repo = rt
        .block_on(
            DynamoDbRepository::builder()
                .endpoint_url(url)
                .table(table)
                .namespace(namespace)
                .timeout(Duration::from_secs(10))
                .connect(),
        )
        .expect("connect");
    RateLimiter::new(repo)
}

#[test]
fn version_and_help_need_no_table() {
    let version = json(&mut zl("http://127.0.0.1:9", "unused"), &["version"]);
    assert_eq!(version["schema_version"], "0.10.0");
    assert_eq!(version["client_version"], env!("CARGO_PKG_VERSION"));
    let help = expect(&mut zl("http://127.0.0.1:9", "unused"), &["--help"], 0);
    for command in [
        "local",
        "deploy",
        "namespace",
        "limits",
        "loadtest",
        "cfn-template",
    ] {
        assert!(
            stdout(&help).contains(command),
            "{command} missing from --help"
        );
    }
}

#[test]
fn exit_codes_say_what_went_wrong() {
    let (url, table) = deployed("codes");
    let z = || zl(&url, &table);
    // 2: bad arguments, caught before any call.
    fails(
        &mut z(),
        &["system", "set-limits", "-l", "rpm:0"],
        2,
        "must be positive",
    );
    fails(
        &mut z(),
        &["system", "set-limits", "-l", "rpm"],
        2,
        "NAME:RATE",
    );
    fails(&mut z(), &["no-such-command"], 2, "unrecognized subcommand");
    let out = fails(
        &mut z(),
        &["entity", "create", "bad id"],
        2,
        "invalid entity_id",
    );
    assert!(stderr(&out).contains("hint:"), "{}", stderr(&out));
    fails(&mut zl(&url, "t2"), &["status"], 2, "invalid table");
    // Deleting without a terminal and without --yes is refused, and nothing is deleted.
    fails(&mut z(), &["delete"], 2, "--yes");
    expect(&mut z(), &["status"], 0);
    // 4: table or namespace not found, with what to do.
    fails(
        &mut zl(&url, &unique_table("missing")),
        &["status"],
        4,
        "zae-limiter deploy",
    );
    let args = ["-N", "nope", "system", "get-limits"];
    fails(&mut z(), &args, 4, "namespace register nope");
    fails(
        &mut z(),
        &["namespace", "show", "nope"],
        4,
        "namespace not found",
    );
    // 3: DynamoDB cannot be reached.
    let port = zae_limiter::local::free_port().unwrap();
    let dead = format!("http://127.0.0.1:{port}");
    fails(
        &mut zl(&dead, &table),
        &["--timeout", "1s", "status"],
        3,
        "unavailable",
    );
    // 1: other errors.
    fails(
        &mut z(),
        &["entity", "show", "ghost"],
        1,
        "entity not found: ghost",
    );
}

#[test]
fn deploy_status_check_and_delete() {
    let (url, table) = (endpoint(), unique_table("deploy"));
    let first = json(
        &mut zl(&url, &table),
        &[
            "deploy",
            "--deletion-protection",
            "--stream",
            "--tag",
            "team=platform",
        ],
    );
    assert_eq!(first["created"], true);
    assert_eq!(first["namespace"], "default");
    assert_eq!(first["deletion_protection"], true);
    // Idempotent: a second deploy finds the table and the namespace as they are.
    let second = json(&mut zl(&url, &table), &["deploy"]);
    assert_eq!(second["created"], false);
    assert_eq!(second["namespace_id"], first["namespace_id"]);

    let status = json(&mut zl(&url, &table), &["status"]);
    assert_eq!(status["table"], table.as_str());
    assert_eq!(status["status"], "ACTIVE");
    assert_eq!(status["billing"], "PAY_PER_REQUEST");
    assert_eq!(status["namespaces"], serde_json::json!(["default"]));
    assert_eq!(status["schema_version"], "0.10.0");
    assert_eq!(status["compatible"], true);
    assert_eq!(status["ttl"], true);
    assert_eq!(status["stream"], "NEW_AND_OLD_IMAGES");
    assert_eq!(status["deletion_protection"], true);
    let text = stdout(&expect(&mut zl(&url, &table), &["status"], 0));
    assert!(
        text.contains("deletion_protection:") && text.contains("namespaces:"),
        "{text}"
    );

    let check = json(&mut zl(&url, &table), &["check"]);
    assert_eq!(check["compatible"], true);

    // Deletion protection holds, and the error says how to lift it.
    fails(
        &mut zl(&url, &table),
        &["delete", "--yes"],
        3,
        "deletion protection",
    );
    expect(&mut zl(&url, &table), &["status"], 0);

    // deploy on an existing table turns on what is asked and safe, and names the rest.
    let (url, converge) = deployed("converge");
    let again = json(
        &mut zl(&url, &converge),
        &["deploy", "--deletion-protection", "--stream"],
    );
    assert_eq!(again["created"], false);
    assert_eq!(
        again["changed"],
        serde_json::json!(["deletion protection turned on"])
    );
    assert_eq!(again["differences"], serde_json::json!(["no stream"]));
    assert_eq!(
        json(&mut zl(&url, &converge), &["status"])["deletion_protection"],
        true
    );
    let text = stdout(&expect(
        &mut zl(&url, &converge),
        &["deploy", "--deletion-protection"],
        0,
    ));
    assert!(text.contains("exists; unchanged"), "{text}");

    let (url, plain) = deployed("delete");
    let provisioned = unique_table("prov");
    let out = json(
        &mut zl(&url, &provisioned),
        &[
            "deploy",
            "--billing",
            "provisioned",
            "--read-capacity",
            "7",
            "--write-capacity",
            "3",
        ],
    );
    assert_eq!(out["billing"], "PROVISIONED");
    let status = json(&mut zl(&url, &provisioned), &["status"]);
    assert_eq!(status["billing"], "PROVISIONED");
    for t in [&plain, &provisioned] {
        let deleted = json(&mut zl(&url, t), &["delete", "--yes"]);
        assert_eq!(deleted["deleted"], true);
        expect(&mut zl(&url, t), &["status"], 4);
        expect(&mut zl(&url, t), &["check"], 4);
    }
}

#[test]
fn cfn_template_matches_the_table_deploy_creates() {
    let (url, table) = deployed("cfn");
    let template = json(
        &mut zl(&url, &table),
        &[
            "cfn-template",
            "--pitr",
            "--stream",
            "--tag",
            "team=platform",
        ],
    );
    let resource = &template["Resources"]["RateLimitTable"];
    assert_eq!(resource["Type"], "AWS::DynamoDB::Table");
    let props = &resource["Properties"];
    assert_eq!(props["BillingMode"], "PAY_PER_REQUEST");
    assert_eq!(
        props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"],
        true
    );
    assert_eq!(
        props["StreamSpecification"]["StreamViewType"],
        "NEW_AND_OLD_IMAGES"
    );
    assert_eq!(props["TimeToLiveSpecification"]["AttributeName"], "ttl");
    assert_eq!(props["Tags"][0]["Key"], "team");
    assert_eq!(
        template["Parameters"]["TableName"]["Default"],
        table.as_str()
    );

    // The template's indexes are exactly those of the table `deploy` made.
    let rt = runtime();
    let described = rt
        .block_on(
            DynamoDbRepository::builder()
                .endpoint_url(&url)
                .table(&table)
                .connect_table(),
        )
        .unwrap();
    let live = rt
        .block_on(
            described
                .client()
                .describe_table()
                .table_name(&table)
                .send(),
        )
        .unwrap();
    let live = live.table().unwrap();
    let mut live_indexes: Vec<(String, String, String, String)> = live
        .global_secondary_indexes()
        .iter()
        .map(|i| {
            let keys = i.key_schema();
            (
                i.index_name().unwrap().to_string(),
                keys[0].attribute_name().to_string(),
                keys[1].attribute_name().to_string(),
                i.projection()
                    .unwrap()
                    .projection_type()
                    .unwrap()
                    .as_str()
                    .to_string(),
            )
        })
        .collect();
    live_indexes.sort();
    let mut template_indexes: Vec<(String, String, String, String)> = props
        ["GlobalSecondaryIndexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["IndexName"].as_str().unwrap().to_string(),
                i["KeySchema"][0]["AttributeName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                i["KeySchema"][1]["AttributeName"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                i["Projection"]["ProjectionType"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    template_indexes.sort();
    assert_eq!(template_indexes, live_indexes);
    let live_attributes: Vec<String> = live
        .attribute_definitions()
        .iter()
        .map(|a| a.attribute_name().to_string())
        .collect();
    let template_attributes: Vec<String> = props["AttributeDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["AttributeName"].as_str().unwrap().to_string())
        .collect();
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(template_attributes), sorted(live_attributes));

    // The default rendering is YAML of the same template.
    let yaml = stdout(&expect(
        &mut zl(&url, &table),
        &[
            "cfn-template",
            "--pitr",
            "--stream",
            "--tag",
            "team=platform",
        ],
        0,
    ));
    let parsed: Value = serde_norway::from_str(&yaml).unwrap();
    assert_eq!(parsed, template);
    let provisioned = json(
        &mut zl(&url, &table),
        &[
            "cfn-template",
            "--billing",
            "provisioned",
            "--read-capacity",
            "9",
        ],
    );
    let props = &provisioned["Resources"]["RateLimitTable"]["Properties"];
    assert_eq!(props["ProvisionedThroughput"]["ReadCapacityUnits"], 9);
    assert_eq!(
        props["GlobalSecondaryIndexes"][0]["ProvisionedThroughput"]["WriteCapacityUnits"],
        5
    );

    // With the aggregator: the function on the table's stream, fed bucket records only,
    // failing batches to a dead-letter queue with an alarm on it.
    let with = json(&mut zl(&url, &table), &["cfn-template", "--aggregator"]);
    let resources = &with["Resources"];
    assert!(resources["RateLimitTable"]["Properties"]["StreamSpecification"].is_object());
    let mapping = &resources["AggregatorEventSourceMapping"]["Properties"];
    assert_eq!(
        mapping["FunctionResponseTypes"],
        serde_json::json!(["ReportBatchItemFailures"])
    );
    assert_eq!(
        mapping["DestinationConfig"]["OnFailure"]["Destination"]["Fn::GetAtt"][0],
        "AggregatorDeadLetterQueue"
    );
    let filter: Value = serde_json::from_str(
        mapping["FilterCriteria"]["Filters"][0]["Pattern"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(filter["dynamodb"]["NewImage"]["SK"]["S"][0], "#STATE");
    assert_eq!(
        resources["AggregatorFunction"]["Properties"]["Environment"]["Variables"]["TABLE_NAME"]
            ["Ref"],
        "RateLimitTable"
    );
    assert_eq!(
        resources["AggregatorDeadLetterAlarm"]["Type"],
        "AWS::CloudWatch::Alarm"
    );
    assert!(
        resources["AggregatorRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["Action"] == "sqs:SendMessage")
    );
}

#[test]
fn namespaces_register_show_list_and_delete_with_their_items() {
    let (url, table) = deployed("ns");
    let registered = json(
        &mut zl(&url, &table),
        &["namespace", "register", "tenant-b"],
    );
    let id = registered["id"].as_str().unwrap().to_string();
    let again = json(
        &mut zl(&url, &table),
        &["namespace", "register", "tenant-b"],
    );
    assert_eq!(again["id"], id.as_str(), "register is idempotent");
    let shown = json(&mut zl(&url, &table), &["namespace", "show", "tenant-b"]);
    assert_eq!(shown["id"], id.as_str());
    assert_eq!(shown["status"], "active");
    let shown = json(
        &mut zl(&url, &table),
        &["-N", "tenant-b", "namespace", "show"],
    );
    assert_eq!(shown["name"], "tenant-b");

    // Items in tenant-b; default's items must survive its deletion.
    let b = || {
        let mut cmd = zl(&url, &table);
        cmd.args(["-N", "tenant-b"]);
        cmd
    };
    expect(&mut b(), &["system", "set-limits", "-l", "rpm:10"], 0);
    expect(&mut b(), &["entity", "create", "key-1"], 0);
    expect(&mut b(), &["entity", "create", "key-2"], 0);
    expect(
        &mut zl(&url, &table),
        &["resource", "set-limits", "api", "-l", "rpm:7"],
        0,
    );

    let list = json(&mut zl(&url, &table), &["namespace", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["default", "tenant-b"]);

    expect(
        &mut zl(&url, &table),
        &["namespace", "delete", "tenant-b"],
        2,
    );
    let deleted = json(
        &mut zl(&url, &table),
        &["namespace", "delete", "tenant-b", "--yes"],
    );
    // The system config, two entities and their three audit events.
    assert!(deleted["items_deleted"].as_u64().unwrap() >= 6, "{deleted}");
    expect(&mut zl(&url, &table), &["namespace", "show", "tenant-b"], 4);
    expect(&mut b(), &["system", "get-limits"], 4);
    let list = json(&mut zl(&url, &table), &["namespace", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let kept = json(&mut zl(&url, &table), &["resource", "get-limits", "api"]);
    assert_eq!(kept["limits"][0]["capacity"], 7);
}

#[test]
fn limits_at_every_level_entities_and_bucket_status() {
    let (url, table) = deployed("levels");
    let z = || zl(&url, &table);
    let set = json(
        &mut z(),
        &[
            "system",
            "set-limits",
            "-l",
            "rpm:1000",
            "-l",
            "tpm:100000:burst=150000",
        ],
    );
    assert_eq!(set["limits"][1]["capacity"], 150_000);
    let got = json(&mut z(), &["system", "get-limits"]);
    assert_eq!(got["limits"].as_array().unwrap().len(), 2);
    assert_eq!(got["on_unavailable"], Value::Null);
    json(
        &mut z(),
        &["system", "set-defaults", "--on-unavailable", "allow"],
    );
    let got = json(&mut z(), &["system", "get-limits"]);
    assert_eq!(got["on_unavailable"], "allow");
    let text = stdout(&expect(&mut z(), &["system", "get-limits"], 0));
    assert!(text.contains("tpm:100000:burst=150000"), "{text}");
    assert!(text.contains("on_unavailable: allow"), "{text}");

    json(
        &mut z(),
        &[
            "resource",
            "set-limits",
            "gpt-4",
            "-l",
            "tokens:500:100/10s",
        ],
    );
    let got = json(&mut z(), &["resource", "get-limits", "gpt-4"]);
    assert_eq!(
        got["limits"][0],
        serde_json::json!({"name": "tokens", "capacity": 500, "refill_amount": 100, "refill_period_seconds": 10})
    );

    let parent = json(
        &mut z(),
        &[
            "entity",
            "create",
            "proj-1",
            "--name",
            "Project One",
            "--metadata",
            "tier=gold",
        ],
    );
    assert_eq!(parent["name"], "Project One");
    assert_eq!(parent["metadata"]["tier"], "gold");
    let child = json(
        &mut z(),
        &[
            "entity",
            "create",
            "key-1",
            "--parent",
            "proj-1",
            "--cascade",
        ],
    );
    assert_eq!(child["parent_id"], "proj-1");
    assert_eq!(child["cascade"], true);
    expect(&mut z(), &["entity", "create", "key-1"], 1);
    let shown = json(&mut z(), &["entity", "show", "key-1"]);
    assert_eq!(shown["cascade"], true);
    let children = json(&mut z(), &["entity", "children", "proj-1"]);
    assert_eq!(children[0]["id"], "key-1");

    json(
        &mut z(),
        &[
            "entity",
            "set-limits",
            "key-1",
            "--resource",
            "gpt-4",
            "-l",
            "rpm:10",
        ],
    );
    json(
        &mut z(),
        &[
            "entity",
            "set-limits",
            "proj-1",
            "--resource",
            "gpt-4",
            "-l",
            "rpm:100",
        ],
    );
    let got = json(
        &mut z(),
        &["entity", "get-limits", "key-1", "--resource", "gpt-4"],
    );
    assert_eq!(got["limits"][0]["capacity"], 10);
    let none = json(&mut z(), &["entity", "get-limits", "key-1"]);
    assert_eq!(none["limits"], serde_json::json!([]));

    // Consume through the library, then read the buckets back through the tool.
    let rt = runtime();
    let limiter = limiter(&rt, &url, &table, "default");
    rt.block_on(async {
        let lease = limiter
            .acquire("key-1", "gpt-4")
            .consume([("rpm", 4)])
            .await
            .unwrap();
        lease.commit().await.unwrap();
    });
    let status = json(&mut z(), &["entity", "status", "key-1", "gpt-4"]);
    let rpm = &status[0];
    assert_eq!(rpm["limit"], "rpm");
    assert_eq!(rpm["capacity"], 10);
    assert_eq!(rpm["stored"], true);
    assert_eq!(rpm["consumed"], 4, "the consumption counted");
    let tokens = rpm["tokens"].as_i64().unwrap();
    assert!(
        (6..=7).contains(&tokens),
        "4 of 10 taken moments ago: {tokens}"
    );
    let to_full = rpm["ms_to_full"].as_u64().unwrap();
    assert!((17_000..=24_000).contains(&to_full), "{to_full}");
    // The cascade charged the parent too.
    let parent = json(&mut z(), &["entity", "status", "proj-1", "gpt-4"]);
    assert_eq!(parent[0]["capacity"], 100);
    assert!(parent[0]["tokens"].as_i64().unwrap() <= 97);
    let text = stdout(&expect(
        &mut z(),
        &["entity", "status", "key-1", "gpt-4"],
        0,
    ));
    assert!(
        text.contains("limits from entity") && text.contains("TIME TO FULL"),
        "{text}"
    );

    let deleted = json(
        &mut z(),
        &["entity", "delete-limits", "key-1", "--resource", "gpt-4"],
    );
    assert_eq!(deleted["deleted"], true);
    let deleted = json(
        &mut z(),
        &["entity", "delete-limits", "key-1", "--resource", "gpt-4"],
    );
    assert_eq!(deleted["deleted"], false);
    json(&mut z(), &["resource", "delete-limits", "gpt-4"]);
    json(&mut z(), &["system", "delete-limits"]);
    let got = json(&mut z(), &["system", "get-limits"]);
    assert_eq!(got["limits"], serde_json::json!([]));
    assert_eq!(
        got["on_unavailable"], "allow",
        "deleting limits keeps the policy"
    );
    json(
        &mut z(),
        &["system", "set-defaults", "--on-unavailable", "unset"],
    );
    let got = json(&mut z(), &["system", "get-limits"]);
    assert_eq!(got["on_unavailable"], Value::Null);

    json(&mut z(), &["entity", "delete", "key-1"]);
    expect(&mut z(), &["entity", "show", "key-1"], 1);
    expect(&mut z(), &["entity", "delete", "key-1"], 1);

    // Audit: newest first, limited.
    let events = json(
        &mut z(),
        &["audit", "list", "--entity", "key-1", "--limit", "2"],
    );
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["entity_deleted", "limits_deleted"]);
    let all = json(&mut z(), &["audit", "list", "--entity", "key-1"]);
    assert_eq!(
        all.as_array().unwrap().last().unwrap()["action"],
        "entity_created"
    );
    let system = json(&mut z(), &["audit", "list", "--entity", "$SYSTEM"]);
    assert!(system.as_array().unwrap().len() >= 4);
    expect(
        &mut z(),
        &["audit", "list", "--entity", "key-1", "--limit", "0"],
        2,
    );
}

const MANIFEST: &str = "\
# Limits for the gateway.
system:
  on_unavailable: block
  limits:
    rpm: { capacity: 1000 }
resources:
  gpt-4:
    rpm: 500
    tpm: { capacity: 100000, burst: 150000 }
entities:
  key-1:
    _default_:
      rpm: { capacity: 100 }
    gpt-4:
      tpm: { capacity: 20000, refill_amount: 10000, period: 30s }
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn manifest_round_trip() {
    let (url, table) = deployed("manifest");
    let z = || zl(&url, &table);
    let dir = std::env::temp_dir().join(unique_table("manifest-files"));
    let file = write(&dir, "limits.yaml", MANIFEST);
    let f = file.to_str().unwrap();
    // Something live the manifest does not have: apply must delete it.
    json(
        &mut z(),
        &["resource", "set-limits", "old-model", "-l", "rpm:1"],
    );

    let plan = stdout(&expect(&mut z(), &["limits", "plan", "-f", f], 0));
    assert!(plan.contains("+ system: rpm:1000"), "{plan}");
    assert!(
        plan.contains("+ resource gpt-4: rpm:500, tpm:100000:burst=150000"),
        "{plan}"
    );
    assert!(
        plan.contains("+ entity key-1 (all resources): rpm:100"),
        "{plan}"
    );
    assert!(
        plan.contains("+ entity key-1 on gpt-4: tpm:20000:10000/30"),
        "{plan}"
    );
    assert!(plan.contains("- resource old-model: rpm:1"), "{plan}");
    assert!(
        plan.contains("~ system on_unavailable: not set -> block"),
        "{plan}"
    );
    assert!(
        plan.contains("Plan: 4 to add, 1 to change, 1 to delete."),
        "{plan}"
    );
    // Planning changed nothing.
    let still = json(&mut z(), &["resource", "get-limits", "old-model"]);
    assert_eq!(still["limits"][0]["capacity"], 1);
    expect(&mut z(), &["limits", "diff", "-f", f, "--exit-code"], 1);

    let applied = json(&mut z(), &["limits", "apply", "-f", f]);
    assert_eq!(
        applied,
        serde_json::json!({"added": 4, "changed": 1, "deleted": 1})
    );
    let policy = json(&mut z(), &["system", "get-limits"]);
    assert_eq!(policy["on_unavailable"], "block");
    let diff = json(&mut z(), &["limits", "diff", "-f", f]);
    assert_eq!(diff["drift"], false);
    let text = stdout(&expect(
        &mut z(),
        &["limits", "diff", "-f", f, "--exit-code"],
        0,
    ));
    assert!(text.contains("No drift"), "{text}");
    let plan = stdout(&expect(&mut z(), &["limits", "plan", "-f", f], 0));
    assert!(plan.contains("No changes"), "{plan}");
    let live = json(
        &mut z(),
        &["entity", "get-limits", "key-1", "--resource", "gpt-4"],
    );
    assert_eq!(
        live["limits"][0],
        serde_json::json!({"name": "tpm", "capacity": 20000, "refill_amount": 10000, "refill_period_seconds": 30})
    );
    assert_eq!(
        json(&mut z(), &["resource", "get-limits", "old-model"])["limits"],
        serde_json::json!([])
    );

    // Export gives back a manifest equal to the live state, in YAML and in JSON.
    let exported = stdout(&expect(&mut z(), &["limits", "export"], 0));
    assert!(exported.contains("rpm: 500"), "{exported}");
    let yaml = write(&dir, "exported.yaml", &exported);
    let plan = stdout(&expect(
        &mut z(),
        &["limits", "plan", "-f", yaml.to_str().unwrap()],
        0,
    ));
    assert!(plan.contains("No changes"), "{exported}\n{plan}");
    let as_json = json(&mut z(), &["limits", "export"]);
    assert_eq!(as_json["system"]["on_unavailable"], "block");
    let json_file = write(&dir, "exported.json", &as_json.to_string());
    let plan = json(
        &mut z(),
        &["limits", "plan", "-f", json_file.to_str().unwrap()],
    );
    assert_eq!(plan["changes"], serde_json::json!([]));

    // Someone changes a limit by hand: diff reports the drift.
    json(
        &mut z(),
        &[
            "resource",
            "set-limits",
            "gpt-4",
            "-l",
            "rpm:501",
            "-l",
            "tpm:100000:burst=150000",
        ],
    );
    let diff = json(&mut z(), &["limits", "diff", "-f", f]);
    assert_eq!(diff["drift"], true);
    assert_eq!(diff["differences"][0]["scope"]["resource"], "gpt-4");
    assert_eq!(diff["differences"][0]["before"][0]["capacity"], 501);

    // Edit the manifest: plan shows exactly the edit.
    let edited = MANIFEST
        .replace("rpm: 500", "rpm: 600")
        .replace("    _default_:\n      rpm: { capacity: 100 }\n", "");
    write(&dir, "limits.yaml", &edited);
    let plan = json(&mut z(), &["limits", "plan", "-f", f]);
    assert_eq!(
        plan["summary"],
        serde_json::json!({"add": 0, "change": 1, "delete": 1})
    );
    let text = stdout(&expect(&mut z(), &["limits", "plan", "-f", f], 0));
    assert!(
        text.contains("~ resource gpt-4: rpm:501 -> rpm:600"),
        "{text}"
    );
    assert!(
        text.contains("- entity key-1 (all resources): rpm:100"),
        "{text}"
    );
    let applied = json(&mut z(), &["limits", "apply", "-f", f]);
    assert_eq!(
        applied,
        serde_json::json!({"added": 0, "changed": 1, "deleted": 1})
    );
    assert_eq!(json(&mut z(), &["limits", "diff", "-f", f])["drift"], false);

    // An invalid manifest is rejected with its line and field, before any write.
    let bad = write(
        &dir,
        "bad.yaml",
        "resources:\n  gpt-4:\n    rpm: 1\n    tpm:\n      capacity: 0\n",
    );
    let apply_bad = ["limits", "apply", "-f", bad.to_str().unwrap()];
    let out = fails(&mut z(), &apply_bad, 2, "resources.gpt-4.tpm");
    assert!(stderr(&out).contains("capacity must be positive at line 5"));
    for (text, needle) in [
        (
            "resources:\n  gpt-4:\n    rpm: {capacity: 5, refil_amount: 5}\n",
            "unknown field `refil_amount`",
        ),
        (
            "resources:\n  gpt-4:\n    rpm: 5\n    rpm: 6\n",
            "rpm appears twice",
        ),
        (
            "entities:\n  'no spaces':\n    _default_: {rpm: 1}\n",
            "invalid entity_id",
        ),
        ("system:\n  on_unavailable: sometimes\n", "on_unavailable"),
    ] {
        write(&dir, "bad.yaml", text);
        let out = fails(&mut z(), &apply_bad, 2, needle);
        assert!(stderr(&out).contains("line "), "{text}: {}", stderr(&out));
    }
    let live = json(&mut z(), &["resource", "get-limits", "gpt-4"]);
    assert_eq!(
        live["limits"][0]["capacity"], 600,
        "nothing written by the bad manifests"
    );
    expect(&mut z(), &["limits", "plan", "-f", "/no/such/file.yaml"], 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn loadtest_reports_throughput_latency_and_calls() {
    let memory = json(
        &mut zl("http://127.0.0.1:9", "unused"),
        &[
            "loadtest",
            "--memory",
            "--duration",
            "1s",
            "--concurrency",
            "4",
            "--entities",
            "2",
            "-l",
            "rpm:100",
        ],
    );
    let acquires = memory["acquires"].as_u64().unwrap();
    assert_eq!(
        memory["admitted"].as_u64().unwrap() + memory["rejected"].as_u64().unwrap(),
        acquires
    );
    assert!(
        memory["admitted"].as_u64().unwrap() <= 2 * 100 + 4,
        "{memory}"
    );
    assert!(memory["rejected"].as_u64().unwrap() > 0, "{memory}");
    assert_eq!(memory["dynamodb_calls_per_acquire"], Value::Null);
    assert!(
        memory["latency_p50_ms"].as_f64().unwrap() <= memory["latency_p99_ms"].as_f64().unwrap()
    );

    let (url, table) = deployed("load");
    let dynamo = json(
        &mut zl(&url, &table),
        &[
            "loadtest",
            "--duration",
            "3s",
            "--concurrency",
            "4",
            "--entities",
            "3",
            "-l",
            "rpm:10",
        ],
    );
    let acquires = dynamo["acquires"].as_u64().unwrap();
    let admitted = dynamo["admitted"].as_u64().unwrap();
    assert!(acquires > 30, "{dynamo}");
    assert_eq!(dynamo["errors"], 0, "{dynamo}");
    // 3 entities x 10 per minute, plus at most one refilled token each in 3 s.
    assert!(admitted <= 3 * 10 + 3, "{dynamo}");
    assert_eq!(admitted + dynamo["rejected"].as_u64().unwrap(), acquires);
    // Rejections are mostly answered from the rejection cache, so the rounded figure may
    // read 0.0; it is a number all the same, and well under one call per acquire.
    let per_acquire = dynamo["dynamodb_calls_per_acquire"].as_f64().unwrap();
    assert!((0.0..3.0).contains(&per_acquire), "{dynamo}");
    assert!(dynamo["dynamodb_calls"]["UpdateItem"].as_u64().unwrap() > 0);
    // After a warm-up (first touches), an admitted acquire is one UpdateItem, plus one
    // more per key every fresh-`rf` window (600 ms here) when the rf-locked write refills.
    let steady = json(
        &mut zl(&url, &table),
        &[
            "loadtest",
            "--warmup",
            "1s",
            "--duration",
            "2s",
            "--concurrency",
            "2",
            "--entities",
            "5",
            "-l",
            "rpm:1000000",
        ],
    );
    assert_eq!(steady["rejected"], 0, "{steady}");
    let per_acquire = steady["dynamodb_calls_per_acquire"].as_f64().unwrap();
    assert!((0.95..=1.2).contains(&per_acquire), "{steady}");
    assert_eq!(steady["warmup_s"], 1.0);
    fails(
        &mut zl(&url, &table),
        &["loadtest", "--concurrency", "0"],
        2,
        "at least 1",
    );
    expect(
        &mut zl(&url, &unique_table("none")),
        &["loadtest", "--duration", "1s"],
        4,
    );
}

/// Runs the tool with its own state folder for `local` commands.
fn local_cmd(state: &Path) -> Command {
    let mut cmd = zl("http://127.0.0.1:9", "unused");
    cmd.env("ZAE_LOCAL_STATE_DIR", state);
    cmd
}

#[test]
fn local_start_status_stop_ends_only_its_own_process() {
    let state = std::env::temp_dir().join(unique_table("local-state"));
    let port = zae_limiter::local::free_port().unwrap();
    let p = port.to_string();
    let started = json(&mut local_cmd(&state), &["local", "start", "--port", &p]);
    let endpoint = started["endpoint_url"].as_str().unwrap().to_string();
    assert_eq!(endpoint, format!("http://127.0.0.1:{port}"));
    assert_eq!(
        started["export"],
        format!("export AWS_ENDPOINT_URL={endpoint}")
    );
    let pid = started["pid"].as_u64().unwrap() as u32;
    // Should an assertion fail, the server started detached must not outlive the test.
    struct StopOnDrop(u32);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = zae_limiter::local::stop_detached(self.0);
        }
    }
    let _guard = StopOnDrop(pid);
    // It outlived the command that started it, and serves requests.
    assert!(zae_limiter::local::is_running(pid));
    let table = unique_table("on-local");
    let deployed = json(&mut zl(&endpoint, &table), &["deploy"]);
    assert_eq!(deployed["created"], true);
    let text = stdout(&expect(
        &mut local_cmd(&state),
        &["local", "start", "--port", &p],
        0,
    ));
    assert!(text.contains("already running"), "{text}");
    let status = json(&mut local_cmd(&state), &["local", "status"]);
    assert_eq!(status[0]["port"], port);
    assert_eq!(status[0]["running"], true);

    // A record whose pid is some other process: stop must leave that process alone.
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let fake_port = zae_limiter::local::free_port().unwrap();
    std::fs::write(
        state.join(format!("dynamodb-local-{fake_port}.json")),
        serde_json::json!({
            "pid": bystander.id(), "port": fake_port,
            "endpoint_url": format!("http://127.0.0.1:{fake_port}"),
            "db_path": null, "log_file": "/dev/null",
        })
        .to_string(),
    )
    .unwrap();
    // Two records: stop needs --port.
    expect(&mut local_cmd(&state), &["local", "stop"], 2);
    let stopped = json(
        &mut local_cmd(&state),
        &["local", "stop", "--port", &fake_port.to_string()],
    );
    assert_eq!(stopped["stopped"], false);
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the bystander must still run"
    );
    bystander.kill().unwrap();
    let _ = bystander.wait();

    let stopped = json(&mut local_cmd(&state), &["local", "stop"]);
    assert_eq!(stopped["stopped"], true);
    assert!(!zae_limiter::local::is_running(pid));
    expect(
        &mut zl(&endpoint, &table),
        &["--timeout", "1s", "status"],
        3,
    );
    expect(&mut local_cmd(&state), &["local", "stop"], 1);
    let text = stdout(&expect(&mut local_cmd(&state), &["local", "status"], 0));
    assert!(text.contains("No DynamoDB Local"), "{text}");
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn resources_and_entities_are_disabled_and_enabled() {
    let (url, table) = deployed("flags");
    json(
        &mut zl(&url, &table),
        &["resource", "set-limits", "api", "--limit", "rpm:100"],
    );
    let rt = runtime();
    let limiter = limiter(&rt, &url, &table, "default");
    rt.block_on(async {
        limiter
            .acquire("k1", "api")
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    });
    let disabled = json(&mut zl(&url, &table), &["resource", "disable", "api"]);
    assert_eq!(disabled["disabled"], true, "{disabled}");
    assert_eq!(disabled["buckets_stamped"], 1, "{disabled}");
    let refused = rt
        .block_on(async { limiter.acquire("k1", "api").await })
        .unwrap_err();
    assert!(
        matches!(refused, zae_limiter::Error::ResourceDisabled { .. }),
        "{refused:?}"
    );
    let enabled = json(
        &mut zl(&url, &table),
        &["entity", "enable", "k1", "--resource", "api"],
    );
    assert_eq!(enabled["disabled"], false, "{enabled}");
    limiter.invalidate_config_cache();
    rt.block_on(async {
        limiter
            .acquire("k1", "api")
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    });
    let text = stdout(&expect(
        &mut zl(&url, &table),
        &["--output", "table", "resource", "clear-disabled", "api"],
        0,
    ));
    assert!(text.contains("inheriting"), "{text}");
    let bypassed = json(&mut zl(&url, &table), &["resource", "bypass", "api"]);
    assert_eq!(bypassed["disabled"], "bypass", "{bypassed}");
    assert_eq!(bypassed["buckets_stamped"], 1, "{bypassed}");
    let bypassed = json(
        &mut zl(&url, &table),
        &["entity", "bypass", "k2", "--resource", "api"],
    );
    assert_eq!(bypassed["disabled"], "bypass", "{bypassed}");
}

#[test]
fn check_lists_records_using_features_this_client_refuses() {
    use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
    let (url, table) = deployed("features");
    let clean = json(&mut zl(&url, &table), &["check"]);
    assert_eq!(clean["unsupported_features"], serde_json::json!([]));
    json(
        &mut zl(&url, &table),
        &[
            "entity",
            "set-limits",
            "k1",
            "--resource",
            "api",
            "--limit",
            "rpm:5",
        ],
    );
    // The Python library schedules the limit (half from 9 to 17).
    let rt = runtime();
    rt.block_on(async {
        let repo = DynamoDbRepository::builder()
            .endpoint_url(&url)
            .table(&table)
            .connect()
            .await
            .unwrap();
        repo.client()
            .update_item()
            .table_name(&table)
            .key(
                "PK",
                AttributeValue::S(format!("{}/ENTITY#k1", repo.namespace_id())),
            )
            .key("SK", AttributeValue::S("#CONFIG#api".into()))
            .update_expression("SET l_rpm_sched = :s")
            .expression_attribute_values(":s", AttributeValue::S("1h9-17s500".into()))
            .send()
            .await
            .unwrap();
    });
    let listed = json(&mut zl(&url, &table), &["check"]);
    assert_eq!(listed["compatible"], true);
    assert_eq!(
        listed["unsupported_features"],
        serde_json::json!([{
            "feature": "schedules",
            "namespace": "default",
            "record": "config",
            "subject": "k1/api",
        }]),
        "{listed}"
    );
    let text = stdout(&expect(&mut zl(&url, &table), &["check"], 0));
    assert!(
        text.contains("schedules (1)") && text.contains("schedules: default config k1/api"),
        "{text}"
    );
}

#[test]
fn aggregator_run_counts_the_stream_into_snapshots_once() {
    let (url, table) = (endpoint(), unique_table("agg"));
    let deploy = json(&mut zl(&url, &table), &["deploy", "--stream"]);
    assert_eq!(deploy["created"], true);
    let rt = runtime();
    let limiter = limiter(&rt, &url, &table, "default");
    rt.block_on(async {
        limiter
            .set_resource_limits("api", &[zae_limiter::Limit::per_minute("rpm", 100)])
            .await
            .unwrap();
        for _ in 0..4 {
            limiter
                .acquire("k1", "api")
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
    });
    let once = ["aggregator", "run", "--once", "--windows", "hourly"];
    let first = json(&mut zl(&url, &table), &once);
    assert_eq!(first["consumptions"], 4, "{first}");
    assert_eq!(first["snapshot_writes"], 1, "{first}");
    // Run again: resumed from the saved position, nothing counted twice.
    let again = json(&mut zl(&url, &table), &once);
    assert_eq!(again["consumptions"], 0, "{again}");
    fails(
        &mut zl(&url, &table),
        &["aggregator", "run", "--once", "--windows", "weekly"],
        2,
        "weekly",
    );

    // What it counted, read back.
    let page = json(
        &mut zl(&url, &table),
        &["usage", "list", "--entity", "k1", "--resource", "api"],
    );
    let snapshots = page["snapshots"].as_array().unwrap();
    assert_eq!(snapshots.len(), 1, "{page}");
    assert_eq!(snapshots[0]["counters"]["rpm"], 4);
    assert_eq!(snapshots[0]["window"], "hourly");
    let listed = expect(
        &mut zl(&url, &table),
        &["usage", "list", "--resource", "api", "--chart", "rpm"],
        0,
    );
    let text = stdout(&listed);
    assert!(
        text.contains("rpm=4") && text.contains("rpm per window"),
        "{text}"
    );
    let summary = json(
        &mut zl(&url, &table),
        &["usage", "summary", "--entity", "k1"],
    );
    assert_eq!(summary["snapshots"], 1);
    assert_eq!(summary["total"]["rpm"], 4);
    fails(&mut zl(&url, &table), &["usage", "list"], 2, "--entity");
    fails(
        &mut zl(&url, &table),
        &["usage", "list", "--entity", "k1", "--from", "yesterday"],
        2,
        "2026-11-30T00:00:00Z",
    );
    let capacity = json(
        &mut zl(&url, &table),
        &["resource", "capacity", "api", "--limit", "rpm"],
    );
    assert_eq!(capacity["capacity"], 100);
    assert_eq!(capacity["entities"][0]["entity_id"], "k1");

    // Discovery finds the table, its namespace, its stream and the aggregator that ran.
    let tables = json(&mut zl(&url, "ignored"), &["list"]);
    let found = tables
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["table"] == table.as_str())
        .unwrap_or_else(|| panic!("{table} not in {tables}"));
    assert_eq!(found["namespaces"], serde_json::json!(["default"]));
    assert_eq!(found["stream"], "NEW_AND_OLD_IMAGES");
    assert_eq!(found["aggregator"], "stream consumer");
    assert_eq!(found["compatible"], true);
}
