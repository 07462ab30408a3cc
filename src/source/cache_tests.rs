//! The cache's format: what is written reads back as the same objects; anything else is refused.

use super::*;
use crate::model::Kind;

const OBJECTS: &str = r#"{"kind":"List","items":[
 {"kind":"Service","apiVersion":"v1","metadata":{"name":"web","namespace":"a","labels":{"app":"web","tier":"front"}},
  "spec":{"clusterIPs":["10.96.0.20","fd00::20"],"ports":[{"name":"http","port":80,"targetPort":"http"},
  {"name":"dns","protocol":"UDP","port":53,"targetPort":5353,"nodePort":30053}],"type":"NodePort",
  "sessionAffinity":"ClientIP","sessionAffinityConfig":{"clientIP":{"timeoutSeconds":600}},"internalTrafficPolicy":"Local"}},
 {"kind":"Service","apiVersion":"v1","metadata":{"name":"db","namespace":"a"},"spec":{"clusterIP":"None","ports":[{"port":5432}]}},
 {"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"web-1","namespace":"a","labels":{"kubernetes.io/service-name":"web"}},
  "addressType":"IPv6","endpoints":[{"addresses":["fd00::1"],"conditions":{"ready":false,"serving":true,"terminating":true},"nodeName":"n1","zone":"z"}],
  "ports":[{"name":"http","port":8080,"protocol":"TCP"}]},
 {"kind":"EndpointSlice","apiVersion":"discovery.k8s.io/v1","metadata":{"name":"ext-1","namespace":"a","labels":{"kubernetes.io/service-name":"ext"}},
  "addressType":"FQDN","endpoints":[{"addresses":["example.org"]}]},
 {"kind":"Endpoints","apiVersion":"v1","metadata":{"name":"db","namespace":"a"},
  "subsets":[{"addresses":[{"ip":"192.0.2.5","nodeName":"n2"}],"notReadyAddresses":[{"ip":"192.0.2.6"}],"ports":[{"port":5432}]}]}
]}"#;

fn snapshot(doc: &str) -> Snapshot {
    let d = decode_document(doc.as_bytes(), None);
    assert!(d.errors.is_empty() && d.document_error.is_none(), "{:?} {:?}", d.errors, d.document_error);
    let mut s = Snapshot::default();
    d.objects.into_iter().for_each(|o| s.insert(o));
    s
}

#[test]
fn what_is_written_reads_back_as_the_same_objects() {
    let s = snapshot(OBJECTS);
    let text = encode(&s, "2026-12-01T11:00:00.000Z");
    let back = decode(text.as_bytes()).unwrap();
    assert!(back.skipped.is_empty(), "{:?}", back.skipped);
    assert_eq!(back.written, "2026-12-01T11:00:00.000Z");
    let mut again = Snapshot::default();
    back.objects.into_iter().for_each(|o| again.insert(o));
    assert_eq!(again, s);
    assert_eq!(s.services.len(), 2);
    assert_eq!(s.endpoints.len(), 3);
}

#[test]
fn a_changed_byte_a_foreign_file_and_another_version_are_refused() {
    let text = encode(&snapshot(OBJECTS), "t");
    let torn = text.replacen("10.96.0.20", "10.96.0.21", 1);
    assert!(matches!(decode(torn.as_bytes()), Err(CacheError::Corrupt(_))), "an edited list");
    let v2 = text.replacen("\"edgeproxyCache\":1", "\"edgeproxyCache\":2", 1);
    assert!(matches!(decode(v2.as_bytes()), Err(CacheError::Foreign(_))));
    assert!(matches!(decode(OBJECTS.as_bytes()), Err(CacheError::Foreign(_))), "a plain List");
    assert!(matches!(decode(b"\x00\x01"), Err(CacheError::Foreign(_))));
    assert!(matches!(decode(&text.as_bytes()[..text.len() / 2]), Err(CacheError::Foreign(_))), "truncated");
}

#[test]
fn a_bad_item_with_a_good_checksum_is_skipped_not_trusted() {
    // Someone wrote a cache by hand (a valid checksum) with a hostile name in it.
    let list = r#"{"kind":"List","items":[{"kind":"Service","metadata":{"name":"x\"; rm","namespace":"a"},"spec":{"clusterIP":"10.96.0.9","ports":[{"port":1}]}},
      {"kind":"Service","metadata":{"name":"ok","namespace":"a"},"spec":{"clusterIP":"10.96.0.8","ports":[{"port":1}]}}]}"#;
    let text = format!(
        r#"{{"edgeproxyCache":1,"checksum":"{:016x}","written":"t","list":{list}}}"#,
        checksum(list.as_bytes())
    );
    let back = decode(text.as_bytes()).unwrap();
    assert_eq!(back.objects.len(), 1);
    assert_eq!(back.objects[0].kind(), Kind::Service);
    assert_eq!(back.skipped.len(), 1, "{:?}", back.skipped);
}

#[test]
fn written_atomically_and_read_back_from_disk() {
    let dir = std::env::temp_dir().join(format!("ep-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(read(&dir), Err(CacheError::Missing)));
    let text = encode(&snapshot(OBJECTS), "t");
    let path = write(&dir, &text).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert!(!dir.join(format!("{FILE}.new")).exists());
    assert_eq!(read(&dir).unwrap().objects.len(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}
