//! Plain text tables for a terminal.

use avsync_worker::apply::Identity;

/// Columns padded to their widest cell, a rule under the header.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        format!("  {}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(rule.iter().map(String::as_str).collect()));
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn text(value: &Option<String>) -> String {
    value.clone().unwrap_or_default()
}

fn yes(value: bool) -> String {
    if value { "yes" } else { "no" }.to_owned()
}

/// A tenant's `av_identities` rows, the columns events set.
pub fn identities(rows: &[Identity]) -> String {
    let header = [
        "id",
        "email",
        "name",
        "membership",
        "tenant roles",
        "app role",
        "app access",
        "active",
        "deleted",
    ];
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let name = [&r.given_name, &r.family_name]
                .iter()
                .filter_map(|n| n.as_deref())
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                r.id.clone(),
                text(&r.email),
                name,
                text(&r.membership_status),
                r.tenant_roles.join(","),
                text(&r.app_role),
                yes(r.has_app_access),
                yes(r.is_active),
                r.deleted_at
                    .map(|t| t.format("%H:%M:%S%.3f").to_string())
                    .unwrap_or_default(),
            ]
        })
        .collect();
    render(&header, &cells)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let table = render(
            &["id", "email"],
            &[
                vec!["usr_01".into(), "ada@acme.example".into()],
                vec!["u".into(), String::new()],
            ],
        );
        assert_eq!(
            table,
            "  id      email\n  ------  ----------------\n  usr_01  ada@acme.example\n  u\n"
        );
    }

    #[test]
    fn identities_show_what_events_set() {
        let mut row = Identity::new("usr_01");
        row.email = Some("ada@acme.example".into());
        row.given_name = Some("Ada".into());
        row.tenant_roles = vec!["admin".into(), "member".into()];
        row.has_app_access = true;
        let table = identities(&[row]);
        let line = table.lines().nth(2).unwrap();
        assert!(line.contains("usr_01  ada@acme.example  Ada"), "{line}");
        assert!(line.contains("admin,member"), "{line}");
        assert!(line.contains("yes"), "{line}");
    }
}
