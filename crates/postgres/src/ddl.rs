//! SQL text for identifiers and table definitions. Identifiers are always quoted here, so no
//! SQL is ever built by pasting user text; values always travel as parameters or COPY data.

use lakesync_core::{Column, TableName, TableSchema};

/// Quotes an identifier: `a"b` → `"a""b"`.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `"schema"."table"`.
pub fn qualified(table: &TableName) -> String {
    format!("{}.{}", ident(&table.schema), ident(&table.name))
}

/// A comma-separated list of quoted column names, optionally prefixed by an alias.
pub fn column_list<'a>(names: impl IntoIterator<Item = &'a str>, alias: Option<&str>) -> String {
    names
        .into_iter()
        .map(|n| match alias {
            Some(a) => format!("{a}.{}", ident(n)),
            None => ident(n),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Column definitions (`"name" type [NOT NULL]`) for `CREATE TABLE`; key columns are NOT NULL.
pub fn column_definitions(schema: &TableSchema, key: &[String]) -> String {
    schema.columns.iter().map(|c| column_definition(c, key.contains(&c.name))).collect::<Vec<_>>().join(", ")
}

/// One column definition.
pub fn column_definition(column: &Column, not_null: bool) -> String {
    format!("{} {}{}", ident(&column.name), column.ty.postgres_type(), if not_null { " NOT NULL" } else { "" })
}

/// 64-bit FNV-1a of `bytes`: the same in every build and process, for names that a later run
/// or another replica must find again (staging tables, derived identifiers, session names).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A Postgres identifier of at most 63 bytes built from `base` and `suffix`, shortened with a
/// stable hash when too long (Postgres would silently truncate, and collide).
pub fn derived_name(base: &str, suffix: &str) -> String {
    let full = format!("{base}{suffix}");
    if full.len() <= 63 {
        return full;
    }
    let hash = fnv1a(full.bytes());
    let tail = format!("_{:08x}{suffix}", hash as u32);
    let mut cut = 63 - tail.len();
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &base[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_quoted_and_quotes_doubled() {
        assert_eq!(ident("select"), "\"select\"");
        assert_eq!(ident("a\"; drop table x; --"), "\"a\"\"; drop table x; --\"");
        assert_eq!(qualified(&TableName::new("my.s", "t")), "\"my.s\".\"t\"");
    }

    #[test]
    fn derived_names_fit_in_63_bytes_and_stay_distinct() {
        let long = "x".repeat(70);
        let a = derived_name(&long, "_pkey");
        let b = derived_name(&format!("{long}y"), "_pkey");
        assert!(a.len() <= 63 && b.len() <= 63 && a != b && a.ends_with("_pkey"));
        assert_eq!(derived_name("t", "_pkey"), "t_pkey");
    }
}
