//! Effective settings: defaults ← groups (lowest priority first) ← device
//! ← the logged-in user's profile, each layer merged into the one before
//! with JSON Merge Patch semantics (RFC 7386): objects merge key by key at
//! any depth, any other value replaces, and `null` removes a key. A later
//! layer can thus switch off something a group set, without a special
//! "unset" marker.
//!
//! The version is a hash of every input, not of the result: it changes
//! whenever an administrator changes anything the device depends on
//! (including who is logged in), so a device never has to compare whole
//! documents, and balancers sharing a database agree on it without any
//! counter to keep in step.

use serde_json::{Map, Value};

use super::model::{sha256_hex, SettingsInputs};

/// Merge `patch` into `base` (RFC 7386).
pub fn merge(base: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *base = patch.clone();
        return;
    };
    if !base.is_object() {
        *base = Value::Object(Map::new());
    }
    let Value::Object(target) = base else {
        unreachable!("made an object above")
    };
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The merged settings and their version.
#[derive(Debug, Clone, PartialEq)]
pub struct Effective {
    pub settings: Value,
    pub version: String,
}

pub fn effective(inputs: &SettingsInputs) -> Effective {
    let mut settings = Value::Object(Map::new());
    merge(&mut settings, &inputs.defaults);
    for g in &inputs.groups {
        merge(&mut settings, &g.settings);
    }
    merge(&mut settings, &inputs.device);
    if let Some((_, Some(profile))) = &inputs.user {
        merge(&mut settings, profile);
    }
    Effective {
        settings,
        version: version(inputs),
    }
}

/// 16 hex digits of SHA-256 over a canonical form of the inputs.
/// serde_json's maps are sorted (no `preserve_order` feature), so equal
/// inputs always serialize alike.
pub fn version(inputs: &SettingsInputs) -> String {
    let groups: Vec<Value> = inputs
        .groups
        .iter()
        .map(|g| serde_json::json!([g.name, g.priority, g.settings]))
        .collect();
    let user = inputs
        .user
        .as_ref()
        .map(|(name, profile)| serde_json::json!([name, profile]));
    let canonical = serde_json::json!([1, inputs.defaults, groups, inputs.device, user]);
    sha256_hex(canonical.to_string().as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::module::devices::model::Group;
    use serde_json::json;

    fn inputs() -> SettingsInputs {
        SettingsInputs {
            defaults: json!({"volume": 5, "display": {"brightness": 80, "timeout": 300}, "apps": ["mail"]}),
            groups: vec![
                Group {
                    name: "floor".into(),
                    priority: 1,
                    settings: json!({"display": {"timeout": 60}, "proxy": "p1"}),
                },
                Group {
                    name: "kiosk".into(),
                    priority: 9,
                    settings: json!({"volume": 0, "apps": ["browser"]}),
                },
            ],
            device: json!({"display": {"brightness": 50}}),
            user: None,
        }
    }

    #[test]
    fn layers_merge_deeply_in_order() {
        let e = effective(&inputs());
        assert_eq!(
            e.settings,
            json!({"volume": 0, "display": {"brightness": 50, "timeout": 60}, "apps": ["browser"], "proxy": "p1"})
        );
    }

    #[test]
    fn user_profile_applies_last_and_null_removes() {
        let mut i = inputs();
        i.user = Some((
            "alice".into(),
            Some(json!({"volume": 7, "proxy": null, "display": {"timeout": null}})),
        ));
        let e = effective(&i);
        assert_eq!(
            e.settings,
            json!({"volume": 7, "display": {"brightness": 50}, "apps": ["browser"]})
        );
    }

    #[test]
    fn non_object_layers_replace() {
        let mut base = json!({"a": {"b": 1}});
        merge(&mut base, &json!({"a": 3}));
        assert_eq!(base, json!({"a": 3}));
        merge(&mut base, &json!({"a": {"c": 1}}));
        assert_eq!(base, json!({"a": {"c": 1}}));
    }

    #[test]
    fn version_changes_with_every_input() {
        let base = version(&inputs());
        assert_eq!(base.len(), 16);
        assert_eq!(base, version(&inputs()), "stable");
        type Change = Box<dyn Fn(&mut SettingsInputs)>;
        let changes: Vec<Change> = vec![
            Box::new(|i| i.defaults["volume"] = json!(6)),
            Box::new(|i| i.groups[0].priority = 2),
            Box::new(|i| i.groups[1].settings = json!({})),
            Box::new(|i| {
                i.groups.pop();
            }),
            Box::new(|i| i.device = json!({})),
            Box::new(|i| i.user = Some(("bob".into(), None))),
            Box::new(|i| i.user = Some(("bob".into(), Some(json!({}))))),
        ];
        let mut seen = std::collections::HashSet::from([base]);
        for change in changes {
            let mut i = inputs();
            change(&mut i);
            assert!(
                seen.insert(version(&i)),
                "a change left the version as it was"
            );
        }
    }
}
