//! Table creation and evolution: new reader columns arrive in one metadata commit (also when
//! replicas race to make it), older readers keep writing, and a type change is refused by name.

use deltalake::arrow::datatypes::{DataType, Field, Schema};
use futures::StreamExt;
use strata::demo::{ORDER_V1, ORDER_V2};
use strata::lake::commit::{CommitError, TableCommitter};
use strata::silver::decode::BatchDecoder;

async fn add_column_commits(url: &url::Url) -> usize {
    let table = deltalake::DeltaTable::try_from_url(url.clone())
        .await
        .expect("table");
    table
        .history(None)
        .filter(|c| {
            let add = c
                .as_ref()
                .ok()
                .and_then(|c| c.operation.as_deref())
                .is_some_and(|o| o == "ADD COLUMN");
            async move { add }
        })
        .count()
        .await
}

#[tokio::test]
async fn tables_evolve_once_by_metadata_commit_and_refuse_type_changes() {
    let dir = tempfile::tempdir().expect("dir");
    let lake = format!("file://{}", dir.path().display());
    let url = strata::lake::table_url(&lake, "silver", "order").expect("url");
    let v1 = BatchDecoder::new(ORDER_V1, "event_time", 16).expect("decoder");
    let v2 = BatchDecoder::new(ORDER_V2, "event_time", 16).expect("decoder");

    let created = strata::lake::open_or_create(url.clone(), &v1.output_schema(), "order")
        .await
        .expect("create");
    assert_eq!(created.version(), Some(0));
    let reopened = strata::lake::open_or_create(url.clone(), &v2.output_schema(), "order")
        .await
        .expect("reopen");
    assert_eq!(reopened.version(), Some(0), "opening never changes a table");

    // Two replicas meet v2 at once: both end up with the new columns, made by one commit.
    let open = || async {
        TableCommitter::new(
            strata::lake::open_or_create(url.clone(), &v1.output_schema(), "order")
                .await
                .expect("open"),
            "g",
            20,
        )
    };
    let (mut a, mut b) = (open().await, open().await);
    let v2_rows = v2.output_schema();
    let (plan_a, plan_b) = tokio::join!(a.evolve(&v2_rows), b.evolve(&v2_rows));
    let (plan_a, plan_b) = (plan_a.expect("a evolves"), plan_b.expect("b evolves"));
    let added: Vec<String> = plan_a
        .added
        .iter()
        .chain(&plan_b.added)
        .map(|f| f.name().clone())
        .collect();
    assert_eq!(added, ["coupon", "quantity"], "one of them added both");
    assert_eq!(add_column_commits(&url).await, 1);
    for plan in [&plan_a, &plan_b] {
        let quantity = plan
            .file_schema
            .field_with_name("quantity")
            .expect("quantity");
        assert!(
            quantity.is_nullable(),
            "rows of older writers are null there"
        );
    }

    // Again: nothing to add, no commit.
    let again = a.evolve(&v2.output_schema()).await.expect("again");
    assert!(again.added.is_empty());
    assert_eq!(add_column_commits(&url).await, 1);

    // A replica still on v1 writes the table's extra columns as nulls and changes nothing.
    let old = open().await.evolve(&v1.output_schema()).await.expect("v1");
    assert!(old.added.is_empty());
    assert!(old.file_schema.field_with_name("coupon").is_ok());

    // A type change is refused, naming the column.
    let mut fields: Vec<Field> = v2
        .output_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for field in &mut fields {
        if field.name() == "amount" {
            *field = Field::new("amount", DataType::Utf8, false);
        }
    }
    match open().await.evolve(&Schema::new(fields)).await {
        Err(CommitError::Schema(why)) => assert!(why.contains("amount"), "{why}"),
        other => panic!("a type change must be refused: {other:?}"),
    }
    assert_eq!(add_column_commits(&url).await, 1);
}
