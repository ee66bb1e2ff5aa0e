use std::collections::BTreeMap;

use serde::Deserialize;

use super::*;

#[derive(Debug, Deserialize, PartialEq)]
struct Inner {
    a: u32,
}

#[derive(Debug, Deserialize)]
struct Doc {
    t: BTreeMap<String, Spanned<BTreeMap<String, Spanned<Inner>>>>,
}

fn read(text: &str) -> Doc {
    toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

#[test]
fn a_table_is_placed_in_every_form() {
    let forms = [
        "[t.x]\n[t.x.y]\na = 1\n",
        "[t.x.y]\na = 1\n",
        "t.x.y.a = 1\n",
        "[t]\nx.y.a = 1\n",
        "t = { x = { y = { a = 1 } } }\n",
    ];
    for text in forms {
        let doc = read(text);
        let x = &doc.t["x"];
        let y = &x.get_ref()["y"];
        assert_eq!(y.get_ref(), &Inner { a: 1 }, "{text}");
        // Placed somewhere on the table's own text: its header, or its first key.
        assert!(
            x.span().end > 0 && y.span().end > 0,
            "{text}: {:?} {:?}",
            x.span(),
            y.span()
        );
    }
}

#[test]
fn a_value_without_a_position_still_reads() {
    let value: toml::Value = toml::from_str("a = 3").unwrap();
    let inner: Spanned<Inner> = value.try_into().unwrap();
    assert_eq!(inner.get_ref(), &Inner { a: 3 });
    let number: Spanned<u32> = toml::Value::Integer(4).try_into().unwrap();
    assert_eq!((*number.get_ref(), number.span()), (4, 0..0));
}

#[test]
fn the_path_at_an_offset_is_the_deepest_key_there() {
    let text = "[services.media]\njoin_steps = [10, 50]\ncondition = { min_jobs = \"x\" }\n\
                [[machines]]\nid = \"m\"\n";
    let at = |needle: &str| path_text(&path_at(text, text.find(needle).unwrap()).unwrap());
    assert_eq!(at("50"), "services.media.join_steps[1]");
    assert_eq!(at("\"x\""), "services.media.condition.min_jobs");
    assert_eq!(at("\"m\""), "machines[0].id");
    assert_eq!(at("[services"), "services.media");
    let id = span_of(text, &parse_path("machines[0].id")).unwrap();
    assert_eq!(&text[id], "id");
}
