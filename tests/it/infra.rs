//! `infra/template.yaml`, checked offline: `cfn-lint` (installed by `scripts/test`) finds nothing,
//! not even informational notes, with the project's own rules (`infra/rules.txt`: encryption and
//! the optional KMS key, redrive, TTL, point-in-time recovery, log retention, alarm actions);
//! `checkov` (likewise) finds nothing but what the template skips with a written reason; both
//! are shown to bite on a broken copy. And the template agrees with the binary it deploys: every
//! setting it passes exists, every command it runs exists, the queue and table names follow the
//! code's conventions, each role is granted exactly the calls its process's code makes, and
//! every alarm on the application's own metrics names a metric the code writes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use shared::domain::RequestKind;

const TEMPLATE: &str = include_str!("../../infra/template.yaml");

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

/// The template with each `(from, to)` edit made once; every `from` must be there.
fn broken(edits: &[(&str, &str)]) -> String {
    edits.iter().fold(TEMPLATE.to_owned(), |t, (from, to)| {
        assert!(t.contains(from), "the template has no `{from}`");
        t.replacen(from, to, 1)
    })
}

#[test]
fn the_project_rules_catch_a_broken_template() {
    let broken = broken(&[
        ("maxReceiveCount: 20", "maxReceiveCount: 3"),
        (
            "SqsManagedSseEnabled: !If [HasKmsKey, !Ref AWS::NoValue, true]",
            "SqsManagedSseEnabled: !If [HasKmsKey, !Ref AWS::NoValue, false]",
        ),
        ("AttributeName: expires_at", "AttributeName: ttl"),
        (
            "PointInTimeRecoveryEnabled: true",
            "PointInTimeRecoveryEnabled: false",
        ),
        (
            "      SecretString: !Ref OpenAIApiKey\n      KmsKeyId:",
            "      SecretString: !Ref OpenAIApiKey\n      # KmsKeyId:",
        ),
    ]);
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
        "Secrets take the customer-managed key when one is given",
    ] {
        assert!(out.contains(rule), "no finding for `{rule}` in:\n{out}");
    }
}

/// Runs checkov (installed by `scripts/test`) on the templates in `dir`, offline: no version
/// check against PyPI, nothing fetched from the vendor's platform.
fn checkov(dir: &Path) -> (bool, String) {
    let exe = std::env::var("CHARACTERBOT_TEST_CHECKOV").expect(
        "CHARACTERBOT_TEST_CHECKOV is not set: run the tests with `scripts/test`, which installs checkov",
    );
    let out = Command::new(exe)
        .args(["--quiet", "--compact", "--skip-download", "--directory"])
        .arg(dir)
        .env("CKV_SKIP_PACKAGE_UPDATE_CHECK", "true")
        .env("BC_SKIP_MAPPING", "true")
        .output()
        .expect("run checkov");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The checks the template skips (`Metadata: checkov: skip: - id: …`), each with its reason.
fn checkov_skips() -> Vec<(String, String)> {
    let lines: Vec<&str> = TEMPLATE.lines().collect();
    let mut skips = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(id) = line.trim().strip_prefix("- id: ") else {
            continue;
        };
        // The reason: `comment:` on the next line, inline or folded over the lines below it.
        let comment = lines
            .get(i + 1)
            .and_then(|l| l.trim().strip_prefix("comment:"));
        let mut reason = comment
            .unwrap_or_default()
            .trim()
            .trim_start_matches(">-")
            .to_owned();
        if comment.is_some() {
            for more in &lines[i + 2..] {
                if more.trim().is_empty()
                    || more.trim().starts_with("- ")
                    || !more.starts_with(&" ".repeat(14))
                {
                    break;
                }
                reason.push(' ');
                reason.push_str(more.trim());
            }
        }
        skips.push((id.to_owned(), reason.trim().to_owned()));
    }
    skips
}

#[test]
fn checkov_finds_nothing_the_template_does_not_skip_with_a_reason() {
    let skips = checkov_skips();
    assert!(!skips.is_empty(), "found the skips");
    for (id, reason) in &skips {
        assert!(id.starts_with("CKV_"), "`{id}` is not a checkov check");
        assert!(
            reason.len() > 40,
            "{id} is skipped without a reason worth the name: `{reason}`"
        );
    }
    let (ok, out) = checkov(&Path::new(env!("CARGO_MANIFEST_DIR")).join("infra"));
    assert!(ok && out.contains("Failed checks: 0"), "checkov:\n{out}");
    // A skip whose finding went away would go unnoticed: each one is used.
    assert!(
        out.contains(&format!("Skipped checks: {}", skips.len())),
        "{} skips in the template, checkov:\n{out}",
        skips.len()
    );
}

#[test]
fn checkov_catches_a_broken_template() {
    let broken = broken(&[
        (
            "        - Key: access_logs.s3.enabled\n          Value: \"true\"",
            "        - Key: access_logs.s3.enabled\n          Value: \"false\"",
        ),
        (
            "      SecretString: !Ref OpenAIApiKey\n      KmsKeyId:",
            "      SecretString: !Ref OpenAIApiKey\n      # KmsKeyId:",
        ),
        (
            "          - id: CKV_AWS_260\n",
            "          - id: CKV_AWS_9260\n",
        ),
    ]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("template.yaml"), broken).unwrap();
    let (ok, out) = checkov(dir.path());
    assert!(!ok, "checkov passed a broken template:\n{out}");
    for check in ["CKV_AWS_91", "CKV_AWS_149", "CKV_AWS_260"] {
        assert!(out.contains(check), "no {check} in:\n{out}");
    }
}

/// The values of `- { Name: X, Value: Y }` environment entries, in order (alarm dimensions are
/// written the same way, but their names are not in capitals).
fn environment() -> Vec<(String, String)> {
    TEMPLATE
        .lines()
        .filter_map(|l| {
            let entry = l.trim().strip_prefix("- { Name: ")?;
            let (name, rest) = entry.split_once(", Value: ")?;
            if !name
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            {
                return None;
            }
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
    assert_eq!(
        redrives,
        vec![shared::queue::redrive_after(max_receives); 2]
    );
}

#[test]
fn refresh_tokens_rotate_as_the_api_renews_them() {
    // The API's default (`CHARACTERBOT_COGNITO_REFRESH=get-tokens`) completes rotations; the
    // template must not pin the older call that rotation refuses.
    assert!(TEMPLATE.contains("RefreshTokenRotation:\n        Feature: ENABLED\n"));
    assert!(!TEMPLATE.contains("CHARACTERBOT_COGNITO_REFRESH"));
}

#[test]
fn names_and_password_rules_follow_the_code() {
    // `SqsQueue::connect` finds the dead-letter queue by `dead_letter_name`; the chat queue is
    // FIFO (its name ends `.fifo`, which is what makes the adapter send groups).
    for (kind, name) in [("persona", "persona"), ("chat", "chat.fifo")] {
        let queue = format!("${{AWS::StackName}}-{name}");
        assert!(
            TEMPLATE.contains(&format!("QueueName: !Sub {queue}\n")),
            "{kind}"
        );
        let dead = shared::queue::sqs::dead_letter_name(&queue);
        assert!(
            TEMPLATE.contains(&format!("QueueName: !Sub {dead}\n")),
            "{kind}"
        );
    }
    assert!(TEMPLATE.contains("FifoQueue: true\n      ContentBasedDeduplication: true\n"));
    // A password the embedded issuer takes, Cognito takes too.
    assert!(TEMPLATE.contains(&format!(
        "MinimumLength: {}\n",
        shared::auth::local::MIN_PASSWORD_CHARS
    )));
    for class in ["Lowercase", "Uppercase", "Numbers", "Symbols"] {
        assert!(TEMPLATE.contains(&format!("Require{class}: false\n")));
    }
    let store = include_str!("../../shared/src/store/dynamodb/mod.rs");
    for attribute in ["pk", "sk", "expires_at"] {
        assert!(store.contains(&format!("\"{attribute}\"")));
        assert!(TEMPLATE.contains(&format!("AttributeName: {attribute}\n")));
    }
}

/// The lines of the template's top-level entry `name` (a parameter, resource or output), its
/// heading left out.
fn entry(name: &str) -> String {
    let heading = format!("  {name}:");
    let mut lines = TEMPLATE.lines().skip_while(|l| *l != heading);
    assert!(lines.next().is_some(), "no {name} in the template");
    lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The names of the template's resources of type `kind`.
fn resources_of_type(kind: &str) -> Vec<String> {
    let resources = TEMPLATE
        .split_once("\nResources:\n")
        .and_then(|(_, r)| r.split_once("\nOutputs:\n"))
        .map(|(r, _)| r)
        .expect("a Resources section before the Outputs");
    resources
        .lines()
        .filter_map(|l| l.strip_prefix("  ")?.strip_suffix(':'))
        .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric()))
        .filter(|name| entry(name).contains(&format!("    Type: {kind}\n")))
        .map(str::to_owned)
        .collect()
}

/// The actions granted in the inline policy of `role`: the words `service:Action`.
fn granted(role: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in entry(role).lines() {
        for word in line.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | ',')) {
            // `dynamodb:LeadingKeys:` is a condition key, not an action.
            if word.ends_with(':') {
                continue;
            }
            if let Some((service, action)) = word.split_once(':') {
                if ["sqs", "sns", "dynamodb", "bedrock", "secretsmanager"].contains(&service)
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

fn workspace_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The `.rs` files under `dir` (a workspace path), recursively.
fn rust_files(dir: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![workspace_file(dir)];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read a source directory") {
            let path = e.expect("a directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// A source file as it runs in production: its test module and its comments left out.
fn production_source(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read a source file");
    let code = text.split("#[cfg(test)]").next().unwrap_or_default();
    code.lines()
        .map(|l| {
            if l.trim_start().starts_with("//") {
                ""
            } else {
                l.split(" // ").next().unwrap_or_default()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Code without whitespace but between two words (`match atomic.sweep(kind)` stays apart), so
/// a call reads the same however it is wrapped, and with the queue of a kind
/// (`self.queue(kind).send(…)`) read as a queue (`queue.send(…)`).
fn compact(code: &str) -> String {
    let chars: Vec<char> = code.chars().collect();
    let mut code = String::new();
    for (i, c) in chars.iter().enumerate() {
        if !c.is_whitespace() {
            code.push(*c);
        } else if code.chars().next_back().is_some_and(is_ident)
            && chars[i + 1..]
                .iter()
                .find(|c| !c.is_whitespace())
                .is_some_and(|c| is_ident(*c))
            && !code.ends_with(' ')
        {
            code.push(' ');
        }
    }
    let mut out = String::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("queue(") {
        let after = &rest[i + "queue(".len()..];
        let arg = after.split(')').next().unwrap_or_default();
        let is_ident =
            !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if is_ident && after[arg.len() + 1..].starts_with('.') {
            out.push_str(&rest[..i]);
            out.push_str("queue");
            rest = &after[arg.len() + 1..];
        } else {
            out.push_str(&rest[..i + "queue(".len()]);
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The functions of `code`: each name with its body, compacted (from its `fn` to the next).
fn functions(code: &str) -> Vec<(String, String)> {
    let starts: Vec<(usize, String)> = code
        .match_indices("fn ")
        .filter(|(i, _)| !code[..*i].chars().next_back().is_some_and(is_ident))
        .map(|(i, _)| {
            (
                i,
                code[i + 3..].chars().take_while(|c| is_ident(*c)).collect(),
            )
        })
        .filter(|(_, name): &(usize, String)| !name.is_empty())
        .collect();
    starts
        .iter()
        .enumerate()
        .map(|(k, (i, name))| {
            let end = starts.get(k + 1).map_or(code.len(), |(j, _)| *j);
            (name.clone(), compact(&code[*i..end]))
        })
        .collect()
}

/// The names under which processes and adapters hold the ports (`state.store`, `self.atomic`,
/// `queue` of a kind). A port reached under another name is not followed: the derivation reads
/// names, not types, so a rename here is a rename there.
const PORTS: &[&str] = &[
    "store",
    "events",
    "fanout",
    "backlog",
    "topic",
    "inbox",
    "queue",
    "atomic",
    "persona_queue",
    "chat_queue",
];

/// Which of `names` the compacted `code` calls: as a method of `self` or of a port (when `own`),
/// or of a port only (code outside the adapters), as an associated function (`Type::name(`), or
/// (when `own`) as a free function.
fn called(code: &str, names: &BTreeSet<String>, own: bool) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in names {
        let hit = code.match_indices(&format!("{name}(")).any(|(i, _)| {
            let before = &code[..i];
            if let Some(receiver) = before.strip_suffix('.') {
                let start = receiver.rfind(|c: char| !is_ident(c)).map_or(0, |j| j + 1);
                let receiver = &receiver[start..];
                PORTS.contains(&receiver) || (own && receiver == "self")
            } else if before.ends_with("::") {
                true
            } else {
                let defined = before.ends_with("fn ");
                own && !defined && !before.chars().next_back().is_some_and(is_ident)
            }
        });
        if hit {
            out.insert(name.clone());
        }
    }
    out
}

/// `get_item` → `GetItem`.
fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect()
}

/// The AWS backend's adapters as a call graph: for each function name, the SDK operations its
/// body calls (`client.get_item()` → `dynamodb:GetItem`) and the items it builds for a
/// transaction (`Put::builder()` → `item:dynamodb:PutItem`), and the adapter functions it
/// calls. Functions are known by name only, so two of one name count as one that does what
/// both do.
struct Adapters(BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>);

/// The adapters' sources (trait defaults included) and the service their clients call.
const ADAPTERS: &[(&str, &str)] = &[
    ("shared/src/store/mod.rs", "dynamodb"),
    ("shared/src/store/personas.rs", "dynamodb"),
    ("shared/src/store/conversations.rs", "dynamodb"),
    ("shared/src/store/requests.rs", "dynamodb"),
    ("shared/src/store/idempotency.rs", "dynamodb"),
    ("shared/src/store/sync.rs", "dynamodb"),
    ("shared/src/store/dynamodb/mod.rs", "dynamodb"),
    ("shared/src/store/dynamodb/sync.rs", "dynamodb"),
    ("shared/src/store/dynamodb/personas.rs", "dynamodb"),
    ("shared/src/store/dynamodb/conversations.rs", "dynamodb"),
    ("shared/src/store/dynamodb/requests.rs", "dynamodb"),
    ("shared/src/store/dynamodb/idempotency.rs", "dynamodb"),
    ("shared/src/events/mod.rs", "dynamodb"),
    ("shared/src/events/fanout.rs", "dynamodb"),
    ("shared/src/events/aws/mod.rs", "dynamodb"),
    ("shared/src/events/aws/topic.rs", "sns"),
    ("shared/src/events/aws/inbox.rs", "sqs"),
    ("shared/src/atomic/mod.rs", "dynamodb"),
    ("shared/src/atomic/aws/mod.rs", "dynamodb"),
    ("shared/src/atomic/aws/accept.rs", "dynamodb"),
    ("shared/src/atomic/aws/settle.rs", "dynamodb"),
    ("shared/src/queue/mod.rs", "sqs"),
    ("shared/src/queue/sqs/mod.rs", "sqs"),
    ("shared/src/queue/sqs/setup.rs", "sqs"),
];

impl Adapters {
    fn read() -> Adapters {
        let mut bodies: Vec<(String, String, &str)> = Vec::new();
        for (path, service) in ADAPTERS {
            for (name, body) in functions(&production_source(&workspace_file(path))) {
                bodies.push((name, body, service));
            }
        }
        let names: BTreeSet<String> = bodies.iter().map(|(n, _, _)| n.clone()).collect();
        let mut graph: BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> = BTreeMap::new();
        for (name, body, service) in &bodies {
            let (ops, callees) = graph.entry(name.clone()).or_default();
            for (i, _) in body.match_indices("client.") {
                let rest = &body[i + "client.".len()..];
                let op: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                if !op.is_empty() && op != "clone" && rest[op.len()..].starts_with("()") {
                    ops.insert(format!("{service}:{}", pascal(&op)));
                }
            }
            for (item, action) in [
                ("Put::builder()", "PutItem"),
                ("Update::builder()", "UpdateItem"),
                ("Delete::builder()", "DeleteItem"),
                ("ConditionCheck::builder()", "ConditionCheckItem"),
            ] {
                if body.contains(item) {
                    ops.insert(format!("item:dynamodb:{action}"));
                }
            }
            callees.extend(called(body, &names, true));
        }
        Adapters(graph)
    }

    fn names(&self) -> BTreeSet<String> {
        self.0.keys().cloned().collect()
    }

    /// The adapter functions a process reaches whose own code (`sources`) calls the adapters,
    /// after start-up (`aws` in `src/ports.rs`, behind `open_ports`: it finds the queues).
    fn reached(&self, sources: &[PathBuf]) -> BTreeSet<String> {
        let lib = production_source(&workspace_file("src/ports.rs"));
        let (_, startup) = functions(&lib)
            .into_iter()
            .find(|(name, _)| name == "aws")
            .expect("`aws` in src/ports.rs");
        let mut todo = called(&startup, &self.names(), false);
        for source in sources {
            todo.extend(called(
                &compact(&production_source(source)),
                &self.names(),
                false,
            ));
        }
        let mut seen = BTreeSet::new();
        while let Some(name) = todo.pop_first() {
            if seen.insert(name.clone()) {
                if let Some((_, callees)) = self.0.get(&name) {
                    todo.extend(callees.difference(&seen).cloned());
                }
            }
        }
        seen
    }

    /// The SDK operations (and transaction items) of such a process.
    fn operations(&self, sources: &[PathBuf]) -> BTreeSet<String> {
        self.reached(sources)
            .iter()
            .filter_map(|name| self.0.get(name))
            .flat_map(|(ops, _)| ops.iter().cloned())
            .collect()
    }
}

/// The IAM actions that authorise `operations`.
fn iam_actions(operations: &BTreeSet<String>) -> BTreeSet<String> {
    operations
        .iter()
        .filter_map(|op| match op.as_str() {
            // Authorised item by item, by the items' own actions.
            "dynamodb:TransactWriteItems" => None,
            "sqs:SendMessageBatch" => Some("sqs:SendMessage".to_owned()),
            "sqs:DeleteMessageBatch" => Some("sqs:DeleteMessage".to_owned()),
            "sqs:ChangeMessageVisibilityBatch" => Some("sqs:ChangeMessageVisibility".to_owned()),
            "sns:PublishBatch" => Some("sns:Publish".to_owned()),
            _ => Some(op.trim_start_matches("item:").to_owned()),
        })
        .collect()
}

/// What each process's own code is: the API's crate, and the consume loop with its job.
fn process_sources() -> [(&'static str, Vec<PathBuf>); 3] {
    let worker = |job: &str| {
        vec![
            workspace_file("workers/src/consumer.rs"),
            workspace_file("workers/src/settle.rs"),
            workspace_file(&format!("workers/src/{job}.rs")),
        ]
    };
    [
        ("ApiTaskRole", rust_files("ingest-api/src")),
        ("PersonaWorkerTaskRole", worker("persona")),
        ("ChatWorkerTaskRole", worker("chat")),
    ]
}

#[test]
fn each_role_is_granted_the_calls_its_code_makes() {
    let adapters = Adapters::read();
    let mut roles = BTreeMap::new();
    for (role, sources) in process_sources() {
        roles.insert(role, iam_actions(&adapters.operations(&sources)));
    }
    // Sanity of the derivation: the paths that must be there are found.
    let api = &roles["ApiTaskRole"];
    for action in [
        "dynamodb:ConditionCheckItem", // accept's transaction checks the conversation's owner
        "dynamodb:UpdateItem",         // turn counter, idempotency answers
        "dynamodb:BatchGetItem",       // a batch's counts
        "dynamodb:DescribeTable",      // readiness
        "sqs:SendMessage",
        "sqs:GetQueueAttributes", // queue depths
        "sqs:GetQueueUrl",
    ] {
        assert!(
            api.contains(action),
            "the API's code has no {action}: {api:?}"
        );
    }
    for role in ["PersonaWorkerTaskRole", "ChatWorkerTaskRole"] {
        let worker = &roles[role];
        for action in [
            "sqs:ReceiveMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:DeleteMessage",
            "sqs:SendMessage",     // dead letters; the outbox sweep
            "dynamodb:DeleteItem", // outbox items: the sweep's and a job's own
            "dynamodb:PutItem",    // results, request states, events
            "dynamodb:Query",      // the outbox sweep
            "dynamodb:UpdateItem", // the outbox sweep's claim
        ] {
            assert!(worker.contains(action), "{role}: no {action} in {worker:?}");
        }
        // The worker roles used to have these without any code calling them.
        for action in [
            "dynamodb:BatchWriteItem",
            "dynamodb:BatchGetItem",
            "sqs:GetQueueAttributes",
        ] {
            assert!(
                !worker.contains(action),
                "{role} now calls {action}: grant it"
            );
        }
    }

    assert_eq!(granted("ApiTaskRole"), roles["ApiTaskRole"], "ApiTaskRole");
    assert_eq!(
        granted("PersonaWorkerTaskRole"),
        roles["PersonaWorkerTaskRole"],
        "PersonaWorkerTaskRole"
    );
    let mut chat = roles["ChatWorkerTaskRole"].clone();
    chat.extend(
        [
            "bedrock:InvokeModel",
            "bedrock:InvokeModelWithResponseStream",
        ]
        .map(String::from),
    );
    assert_eq!(granted("ChatWorkerTaskRole"), chat, "ChatWorkerTaskRole");
    assert_eq!(
        granted("PersonaExecutionRole"),
        BTreeSet::from(["secretsmanager:GetSecretValue".to_string()])
    );
    assert!(
        granted("ExecutionRole").is_empty(),
        "no secret for the others"
    );
}

#[test]
fn workers_delete_only_their_own_outbox_items() {
    // The only deletes a worker's code reaches are of outbox items: the sweep's (`dispatch`,
    // which clears the item it sent) and the one a job names, cleared in its start or
    // settlement (`outbox_delete`, the accept's `OUTBOX#{kind}#{shard}` key of the job's own
    // queue); a worker sweeps its own kind only.
    let adapters = Adapters::read();
    for (role, sources) in process_sources().into_iter().skip(1) {
        let updating: BTreeSet<String> = adapters
            .reached(&sources)
            .into_iter()
            .filter(|f| adapters.0[f].0.iter().any(|op| op == "dynamodb:UpdateItem"))
            .collect();
        assert_eq!(
            updating,
            BTreeSet::from(["claim".to_owned()]),
            "{role}: a worker updates outbox items only, by the sweep's claim"
        );
        let deleting: BTreeSet<String> = adapters
            .reached(&sources)
            .into_iter()
            .filter(|f| {
                adapters.0[f]
                    .0
                    .iter()
                    .any(|op| op == "dynamodb:DeleteItem" || op == "item:dynamodb:DeleteItem")
            })
            .collect();
        assert_eq!(
            deleting,
            BTreeSet::from(["dispatch".to_owned(), "outbox_delete".to_owned()]),
            "{role}"
        );
    }
    let atomic = production_source(&workspace_file("shared/src/atomic/aws/mod.rs"));
    assert!(atomic.contains(r#"format!("OUTBOX#{kind}#{shard}")"#));
    let consumer = compact(&production_source(&workspace_file(
        "workers/src/consumer.rs",
    )));
    assert!(consumer.contains("atomic.sweep(kind)"));
    for kind in RequestKind::ALL {
        let role = entry(&format!("{}WorkerTaskRole", pascal(kind.as_str())));
        let statements: Vec<&str> = role.split("              - Sid: ").skip(1).collect();
        let deletes: Vec<&&str> = statements
            .iter()
            .filter(|s| s.contains("dynamodb:DeleteItem"))
            .collect();
        assert_eq!(deletes.len(), 1, "{kind}: one statement allows deletes");
        let condition = format!(
            "ForAllValues:StringLike:\n                    dynamodb:LeadingKeys: [\"OUTBOX#{kind}#*\"]"
        );
        assert!(
            deletes[0].contains(&condition),
            "{kind}: deletes not bound to its outbox"
        );
        assert!(
            deletes[0].contains("Action: [dynamodb:DeleteItem, dynamodb:UpdateItem]\n"),
            "{kind}: deletes and the sweep's claims alone"
        );
    }
}

/// The CloudWatch namespace of the application's metrics, as the template writes it (`!Sub`).
fn app_namespace() -> String {
    let values: BTreeSet<String> = TEMPLATE
        .lines()
        .filter_map(|l| {
            let v = l
                .trim()
                .strip_prefix("- { Name: CHARACTERBOT_METRICS_EMF_NAMESPACE, Value: ")?;
            Some(
                v.trim_end_matches('}')
                    .trim()
                    .trim_start_matches("!Sub")
                    .trim()
                    .trim_matches('"')
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        values.len(),
        1,
        "one namespace for every service: {values:?}"
    );
    assert_eq!(
        TEMPLATE
            .matches("Name: CHARACTERBOT_METRICS_EMF_NAMESPACE,")
            .count(),
        3,
        "every service sets it"
    );
    values.into_iter().next().unwrap_or_default()
}

/// The metrics the alarm `name` reads: (namespace, metric, dimensions).
fn alarm_metrics(name: &str) -> Vec<(String, String, BTreeMap<String, String>)> {
    let mut out: Vec<(String, String, BTreeMap<String, String>)> = Vec::new();
    let mut namespace = String::new();
    for line in entry(name).lines().map(str::trim) {
        if let Some(ns) = line.strip_prefix("Namespace: ") {
            namespace = ns.trim_start_matches("!Sub ").to_owned();
        } else if let Some(metric) = line.strip_prefix("MetricName: ") {
            out.push((namespace.clone(), metric.to_owned(), BTreeMap::new()));
        } else if let Some(dim) = line.strip_prefix("- { Name: ") {
            let (k, v) = dim
                .trim_end_matches('}')
                .trim()
                .split_once(", Value: ")
                .expect("a dimension");
            if let Some(last) = out.last_mut() {
                last.2.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    out
}

/// The messages a metric filter counts (`$.message = "…"` in its pattern).
fn filter_messages(filter: &str) -> Vec<String> {
    entry(filter)
        .split("$.message = \"")
        .skip(1)
        .filter_map(|m| m.split('"').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_alarm_on_the_apps_metrics_names_a_metric_the_code_writes() {
    let namespace = app_namespace();
    // What the EMF writer makes of the code's metrics: names and dimension sets.
    let metrics = shared::metrics::Metrics::new();
    metrics.job("persona", "dead_lettered");
    metrics
        .job_duration
        .get_or_create(&shared::metrics::KindLabels {
            kind: "chat".into(),
        })
        .observe(0.5);
    let mut emf: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for doc in shared::emf::EmfWriter::new("test").flush(&metrics, 0) {
        let spec = &doc["_aws"]["CloudWatchMetrics"][0];
        let dims: BTreeSet<String> = spec["Dimensions"][0]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(str::to_owned))
            .collect();
        for m in spec["Metrics"].as_array().into_iter().flatten() {
            emf.insert(
                m["Name"].as_str().unwrap_or_default().to_owned(),
                dims.clone(),
            );
        }
    }
    assert!(emf.contains_key("characterbot_jobs_total"), "{emf:?}");
    // The outcomes a worker counts, in the loop and where it applies a settlement.
    let outcomes: String = ["workers/src/consumer.rs", "workers/src/settle.rs"]
        .iter()
        .map(|f| production_source(&workspace_file(f)))
        .collect();
    let kinds: Vec<&str> = RequestKind::ALL.iter().map(|k| k.as_str()).collect();

    // Metric filters count the code's own warnings in its JSON logs, where the text is `message`.
    let main = production_source(&workspace_file("src/main.rs"));
    assert!(
        main.contains(".flatten_event(true)"),
        "log lines carry `message` at the top"
    );
    let code: String = ["shared/src", "workers/src", "ingest-api/src", "src"]
        .iter()
        .flat_map(|d| rust_files(d))
        .map(|f| production_source(&f))
        .collect();
    let mut filtered = BTreeSet::new();
    for filter in resources_of_type("AWS::Logs::MetricFilter") {
        let body = entry(&filter);
        assert!(
            body.contains(&format!("MetricNamespace: !Sub {namespace}\n")),
            "{filter}"
        );
        let messages = filter_messages(&filter);
        assert!(!messages.is_empty(), "{filter} counts no message");
        for message in messages {
            assert!(
                code.contains(&format!("\"{message}\"")),
                "{filter}: the code never logs `{message}`"
            );
        }
        let metric = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("MetricName: "))
            .expect("a metric name");
        filtered.insert(metric.to_owned());
    }

    let mut checked = 0;
    for alarm in resources_of_type("AWS::CloudWatch::Alarm") {
        for (ns, metric, dims) in alarm_metrics(&alarm) {
            if ns != namespace {
                assert!(ns.starts_with("AWS/"), "{alarm}: namespace {ns}");
                continue;
            }
            checked += 1;
            if let Some(labels) = emf.get(&metric) {
                let names: BTreeSet<String> = dims.keys().cloned().collect();
                assert_eq!(
                    &names, labels,
                    "{alarm}: {metric} has exactly these dimensions"
                );
                if let Some(kind) = dims.get("kind") {
                    assert!(kinds.contains(&kind.as_str()), "{alarm}: kind {kind}");
                }
                if let Some(outcome) = dims.get("outcome") {
                    assert!(
                        outcomes.contains(&format!("\"{outcome}\"")),
                        "{alarm}: outcome {outcome}"
                    );
                }
            } else {
                assert!(
                    filtered.contains(&metric),
                    "{alarm}: nothing writes {metric}"
                );
                assert!(
                    dims.is_empty(),
                    "{alarm}: metric filters here write no dimensions"
                );
            }
        }
    }
    assert!(checked >= 4, "alarms on dead letters and publish failures");
}

#[test]
fn the_table_alarms_cover_every_operation_the_services_call() {
    let adapters = Adapters::read();
    let called: BTreeSet<String> = process_sources()
        .into_iter()
        .flat_map(|(_, sources)| adapters.operations(&sources))
        .filter_map(|op| op.strip_prefix("dynamodb:").map(str::to_owned))
        // A control-plane call (the readiness check): no SystemErrors metric.
        .filter(|op| op != "DescribeTable")
        .collect();
    let alarmed: BTreeSet<String> = alarm_metrics("TableSystemErrorsAlarm")
        .into_iter()
        .map(|(ns, metric, dims)| {
            assert_eq!(
                (ns.as_str(), metric.as_str()),
                ("AWS/DynamoDB", "SystemErrors")
            );
            assert_eq!(
                dims.get("TableName").map(String::as_str),
                Some("!Ref Table")
            );
            dims.get("Operation").cloned().unwrap_or_default()
        })
        .collect();
    assert_eq!(alarmed, called);
    let throttling: BTreeSet<String> = alarm_metrics("TableThrottlingAlarm")
        .into_iter()
        .map(|(_, metric, _)| metric)
        .collect();
    assert_eq!(
        throttling,
        BTreeSet::from(["ReadThrottleEvents".into(), "WriteThrottleEvents".into()])
    );
}

#[test]
fn cognito_mails_through_ses_unless_a_trial_says_otherwise() {
    let pool = entry("UserPool");
    assert!(pool.contains(
        "        - EmailSendingAccount: DEVELOPER\n          SourceArn: !Ref SesIdentityArn"
    ));
    assert!(TEMPLATE.contains("UseSes: !Not [!Equals [!Ref SesIdentityArn, COGNITO_DEFAULT]]"));
    // No default: whoever deploys picks SES, or Cognito's capped sender by name.
    assert!(!entry("SesIdentityArn").contains("Default:"));
}

#[test]
fn workers_scale_on_their_backlog_per_running_task() {
    assert!(entry("Cluster").contains("- Name: containerInsights\n          Value: enabled"));
    for kind in RequestKind::ALL {
        let k = pascal(kind.as_str());
        let policy = entry(&format!("{k}WorkerScaling"));
        for part in [
            "PolicyType: TargetTrackingScaling".to_owned(),
            format!("TargetValue: !Ref {k}BacklogPerTask"),
            "MetricName: ApproximateNumberOfMessagesVisible".to_owned(),
            format!("Value: !GetAtt {k}Queue.QueueName"),
            "Namespace: ECS/ContainerInsights".to_owned(),
            "MetricName: RunningTaskCount".to_owned(),
            format!("Value: !GetAtt {k}WorkerService.Name"),
            "Expression: backlog / tasks\n              ReturnData: true".to_owned(),
        ] {
            assert!(policy.contains(&part), "{kind}: no `{part}`");
        }
        // With no task running there is no backlog per task, and nothing would scale out.
        assert!(entry(&format!("{k}WorkerCount")).contains("MinValue: 1\n"));
        assert!(entry(&format!("{k}WorkerScalableTarget"))
            .contains(&format!("MinCapacity: !Ref {k}WorkerCount")));
    }
}

#[test]
fn the_kms_key_is_optional_and_reaches_every_store_of_data() {
    let key = "!If [HasKmsKey, !Ref KmsKeyArn, !Ref AWS::NoValue]";
    for (kind, property) in [
        ("AWS::SQS::Queue", "KmsMasterKeyId"),
        ("AWS::DynamoDB::Table", "KMSMasterKeyId"),
        ("AWS::Logs::LogGroup", "KmsKeyId"),
        ("AWS::SecretsManager::Secret", "KmsKeyId"),
        ("AWS::SNS::Topic", "KmsMasterKeyId"),
    ] {
        let resources = resources_of_type(kind);
        assert!(!resources.is_empty(), "{kind}");
        for r in resources {
            // The events topic holds users' text: the AWS-managed key when none is given.
            let given = entry(&r).contains(&format!("{property}: {key}"))
                || (r == "EventsTopic"
                    && entry(&r).contains(&format!(
                        "{property}: !If [HasKmsKey, !Ref KmsKeyArn, alias/aws/sns]"
                    )));
            assert!(given, "{r}");
        }
    }
    assert!(entry("KmsKeyArn").contains("Default: \"\""));
    let tasks = entry("TaskRolesUseTheKey");
    assert!(tasks.contains("Condition: HasKmsKey"));
    assert!(tasks.contains(
        "Roles: [!Ref ApiTaskRole, !Ref PersonaWorkerTaskRole, !Ref ChatWorkerTaskRole]"
    ));
    let secret = entry("SecretKeyForPersonaTasks");
    assert!(
        secret.contains("Condition: HasKmsKey")
            && secret.contains("Roles: [!Ref PersonaExecutionRole]")
    );
    // The services start once the roles may use the key.
    for service in resources_of_type("AWS::ECS::Service") {
        let depends = entry(&service)
            .lines()
            .find(|l| l.starts_with("    DependsOn:"))
            .map(str::to_owned);
        assert!(
            depends.is_some_and(|l| l.contains("KeyPoliciesReady")),
            "{service}"
        );
    }
}

#[test]
fn the_load_balancer_logs_every_request() {
    let lb = entry("LoadBalancer");
    assert!(lb.contains("DependsOn: AccessLogBucketPolicy"));
    assert!(lb.contains("- Key: access_logs.s3.enabled\n          Value: \"true\""));
    assert!(lb.contains("- Key: access_logs.s3.bucket\n          Value: !Ref AccessLogBucket"));
    let policy = entry("AccessLogBucketPolicy");
    assert!(
        policy.contains("Principal: { Service: logdelivery.elasticloadbalancing.amazonaws.com }")
    );
    assert!(policy.contains("Resource: !Sub ${AccessLogBucket.Arn}/AWSLogs/${AWS::AccountId}/*"));
    // Load balancers write access logs to SSE-S3 buckets only.
    assert!(entry("AccessLogBucket").contains("SSEAlgorithm: AES256"));
}
