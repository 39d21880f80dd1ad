//! `infra/template.yaml`, checked offline: `cfn-lint` (installed by `scripts/test`) finds nothing,
//! not even informational notes, with the project's own rules (`infra/rules.txt`: encryption,
//! redrive, TTL, point-in-time recovery, log retention, alarm actions) — which are shown to bite
//! on a broken copy; and the template agrees with the binary it deploys: every setting it passes
//! exists, every command it runs exists, the queue and table names follow the code's conventions,
//! and each role is granted exactly the calls the code makes.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

const TEMPLATE: &str = include_str!("../infra/template.yaml");

fn cfn_lint(template: &Path) -> (bool, String) {
    let exe = std::env::var("CHARACTERBOT_TEST_CFN_LINT").expect(
        "CHARACTERBOT_TEST_CFN_LINT is not set: run the tests with `scripts/test`, which installs cfn-lint",
    );
    let out = Command::new(exe)
        .arg("--include-checks")
        .arg("I")
        .arg("--custom-rules")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/rules.txt"))
        .arg("--template")
        .arg(template)
        .output()
        .expect("run cfn-lint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn cfn_lint_finds_nothing_in_the_template() {
    let (ok, out) = cfn_lint(&Path::new(env!("CARGO_MANIFEST_DIR")).join("infra/template.yaml"));
    assert!(ok && out.trim().is_empty(), "cfn-lint:\n{out}");
}

#[test]
fn the_project_rules_catch_a_broken_template() {
    let broken = TEMPLATE
        .replacen("maxReceiveCount: 7", "maxReceiveCount: 3", 1)
        .replacen(
            "SqsManagedSseEnabled: true",
            "SqsManagedSseEnabled: false",
            1,
        )
        .replacen("AttributeName: expires_at", "AttributeName: ttl", 1)
        .replacen(
            "PointInTimeRecoveryEnabled: true",
            "PointInTimeRecoveryEnabled: false",
            1,
        );
    assert_ne!(broken, TEMPLATE);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, broken).unwrap();
    let (ok, out) = cfn_lint(&path);
    assert!(!ok, "cfn-lint passed a broken template");
    for rule in [
        "redrive policy allows at least 5 receives",
        "encrypted at rest",
        "TTL is on expires_at",
        "Point-in-time recovery is on",
    ] {
        assert!(out.contains(rule), "no finding for `{rule}` in:\n{out}");
    }
}

/// The values of `- { Name: X, Value: Y }` environment entries, in order.
fn environment() -> Vec<(String, String)> {
    TEMPLATE
        .lines()
        .filter_map(|l| {
            let entry = l.trim().strip_prefix("- { Name: ")?;
            let (name, rest) = entry.split_once(", Value: ")?;
            let value = rest.trim_end_matches('}').trim().trim_matches('"');
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
}

fn characterbot(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_characterbot"))
        .args(args)
        .output()
        .expect("run characterbot");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn every_setting_and_command_in_the_template_exists() {
    let env = environment();
    assert!(env.len() > 30, "found the environment entries");
    let (ok, help) = characterbot(&["serve", "--help"]);
    assert!(ok);
    for (name, _) in &env {
        if name.starts_with("CHARACTERBOT_") {
            assert!(
                help.contains(&format!("env: {name}")),
                "{name} is not a setting"
            );
        }
    }
    assert!(
        help.contains("env: OPENAI_API_KEY"),
        "the secret's variable"
    );
    assert!(TEMPLATE.contains("- Name: OPENAI_API_KEY"));

    for line in TEMPLATE.lines() {
        let Some(list) = line.trim().strip_prefix("Command: [") else {
            continue;
        };
        let mut args: Vec<&str> = list.trim_end_matches(']').split(", ").collect();
        args.push("--help");
        assert!(
            characterbot(&args).0,
            "`characterbot {list}` is not a command"
        );
    }

    // Workers dead-letter first (with a reason on the request); the queue's redrive is the
    // backstop, as `characterbot aws-init` sets it.
    let max_receives: u32 = env
        .iter()
        .find(|(n, _)| n == "CHARACTERBOT_MAX_RECEIVES")
        .map(|(_, v)| v.parse().unwrap())
        .unwrap();
    let redrives: Vec<u32> = TEMPLATE
        .lines()
        .filter_map(|l| l.trim().strip_prefix("maxReceiveCount: "))
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(redrives, vec![max_receives + 2; 2]);
}

#[test]
fn names_and_password_rules_follow_the_code() {
    for kind in ["persona", "chat"] {
        // `SqsQueue::connect` finds the dead-letter queue as `<queue name>-dlq`.
        assert!(TEMPLATE.contains(&format!("QueueName: !Sub ${{AWS::StackName}}-{kind}\n")));
        assert!(TEMPLATE.contains(&format!("QueueName: !Sub ${{AWS::StackName}}-{kind}-dlq\n")));
    }
    // A password the embedded issuer takes, Cognito takes too.
    assert!(TEMPLATE.contains(&format!(
        "MinimumLength: {}\n",
        shared::auth::local::MIN_PASSWORD_CHARS
    )));
    for class in ["Lowercase", "Uppercase", "Numbers", "Symbols"] {
        assert!(TEMPLATE.contains(&format!("Require{class}: false\n")));
    }
    let store = include_str!("../shared/src/store/dynamodb.rs");
    for attribute in ["pk", "sk", "expires_at"] {
        assert!(store.contains(&format!("\"{attribute}\"")));
        assert!(TEMPLATE.contains(&format!("AttributeName: {attribute}\n")));
    }
}

/// AWS actions named by the SDK calls on a client (`client.put_item()` → `PutItem`) in
/// `sources`.
fn actions(prefix: &str, sources: &[&str]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for source in sources {
        for (i, _) in source.match_indices("client") {
            let rest = source[i + "client".len()..].trim_start();
            let Some(rest) = rest.strip_prefix('.') else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if name.is_empty() || name == "clone" || !rest[name.len()..].starts_with("()") {
                continue;
            }
            let action: String = name
                .split('_')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                        .unwrap_or_default()
                })
                .collect();
            found.insert(format!("{prefix}:{action}"));
        }
    }
    found
}

/// The actions granted in the policy of `role`: the words `service:Action` between its
/// heading and the next resource's.
fn granted(role: &str) -> BTreeSet<String> {
    let body: Vec<&str> = TEMPLATE
        .lines()
        .skip_while(|l| *l != format!("  {role}:"))
        .skip(1)
        .take_while(|l| !(l.starts_with("  ") && l.chars().nth(2).is_some_and(|c| c != ' ')))
        .collect();
    assert!(!body.is_empty(), "no role {role}");
    let mut out = BTreeSet::new();
    for line in body {
        for word in line.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',')) {
            if let Some((service, action)) = word.split_once(':') {
                if ["sqs", "dynamodb", "bedrock", "secretsmanager"].contains(&service)
                    && action
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_ascii_uppercase())
                {
                    out.insert(word.to_owned());
                }
            }
        }
    }
    out
}

#[test]
fn each_role_is_granted_the_calls_its_code_makes() {
    let store = [
        include_str!("../shared/src/store/dynamodb.rs"),
        include_str!("../shared/src/events/dynamodb.rs"),
        include_str!("../shared/src/atomic/aws.rs"),
    ];
    let mut dynamo = actions("dynamodb", &store);
    // Tables are created (and their TTL checked) by `aws-init` or the template, never by the
    // running services. The SDK's waiter for an `ACTIVE` table (aws-init) polls DescribeTable.
    dynamo.retain(|a| {
        !a.ends_with("CreateTable")
            && !a.ends_with("UpdateTimeToLive")
            && !a.ends_with("DescribeTimeToLive")
            && !a.ends_with("WaitUntilTableExists")
    });
    // A transaction needs the rights of the writes inside it, and ConditionCheckItem for checks.
    assert!(dynamo.remove("dynamodb:TransactWriteItems"));
    dynamo.insert("dynamodb:ConditionCheckItem".into());
    assert!(dynamo.contains("dynamodb:Query") && dynamo.contains("dynamodb:PutItem"));

    let sqs_source = include_str!("../shared/src/queue/sqs.rs");
    let mut sqs = actions("sqs", &[sqs_source]);
    // Queues are created, and updated on a rerun, by `aws-init` or the template.
    sqs.retain(|a| !a.ends_with("CreateQueue") && !a.ends_with("SetQueueAttributes"));
    // `send_message_batch` is authorised as SendMessage.
    assert!(sqs.remove("sqs:SendMessageBatch"));
    assert!(sqs.contains("sqs:ReceiveMessage") && sqs.contains("sqs:ChangeMessageVisibility"));

    let worker = |extra: &[&str]| {
        let mut all: BTreeSet<String> = dynamo.union(&sqs).cloned().collect();
        all.extend(extra.iter().map(|s| s.to_string()));
        all
    };
    assert_eq!(granted("PersonaWorkerTaskRole"), worker(&[]));
    assert_eq!(
        granted("ChatWorkerTaskRole"),
        worker(&[
            "bedrock:InvokeModel",
            "bedrock:InvokeModelWithResponseStream"
        ])
    );
    // The API enqueues and reads depths; it never receives, deletes or dead-letters.
    let api: BTreeSet<String> = dynamo
        .iter()
        .cloned()
        .chain(
            [
                "sqs:SendMessage",
                "sqs:GetQueueUrl",
                "sqs:GetQueueAttributes",
            ]
            .map(String::from),
        )
        .collect();
    assert_eq!(granted("ApiTaskRole"), api);
    assert_eq!(
        granted("PersonaExecutionRole"),
        BTreeSet::from(["secretsmanager:GetSecretValue".to_string()])
    );
    assert!(
        granted("ExecutionRole").is_empty(),
        "no secret for the others"
    );
}
