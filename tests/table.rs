//! Table creation and the guard against writing into a table of another shape.

use strata::decode::BatchDecoder;
use strata::demo::ORDER_V1;

const READER: &str = include_str!("../schemas/order.avsc");

#[tokio::test]
async fn a_table_of_another_shape_is_refused_at_start_up() {
    let dir = tempfile::tempdir().expect("dir");
    let lake = format!("file://{}", dir.path().display());
    let url = strata::lake::table_url(&lake, "silver", "order").expect("url");

    let v2 = BatchDecoder::new(READER, "event_time", 16).expect("decoder");
    let created = strata::lake::open_or_create(url.clone(), &v2.output_schema(), "order")
        .await
        .expect("create");
    assert_eq!(created.version(), Some(0));
    let reopened = strata::lake::open_or_create(url.clone(), &v2.output_schema(), "order")
        .await
        .expect("reopen");
    assert_eq!(
        reopened.version(),
        Some(0),
        "reopening the same shape creates nothing"
    );

    let v1 = BatchDecoder::new(ORDER_V1, "event_time", 16).expect("decoder");
    let error = strata::lake::open_or_create(url, &v1.output_schema(), "order")
        .await
        .expect_err("other shape");
    let message = error.to_string();
    assert!(
        message.contains("coupon") && message.contains("quantity"),
        "{message}"
    );
}
